"""The ``ftl`` command as a user runs it: separate processes, real exit codes, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_recipe, write_yaml

ROOT = Path(__file__).resolve().parent.parent


def ftl(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ftl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_validate_every_recipe() -> None:
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
    result = ftl("validate", "-q", *recipes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(recipes)


def test_validate_prints_resolved_recipe() -> None:
    result = ftl("validate", "recipes/demo.yaml", "train.learning_rate=5e-4")
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.0005" in result.stdout
    assert "adam_beta2: 0.999" in result.stdout  # defaults are shown


def test_misspelt_key_is_one_line_without_traceback(tmp_path: Path) -> None:
    text = (ROOT / "recipes/demo.yaml").read_text().replace("    r: 32", "    rnak: 32")
    (tmp_path / "bad.yaml").write_text(text)
    result = ftl("validate", str(tmp_path / "bad.yaml"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    line_no = text.splitlines().index("    rnak: 32") + 1
    assert f"bad.yaml:{line_no}: unknown key 'rnak'" in lines[0]
    assert "'rank'" in lines[0] and "'r'" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_data_file_is_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, tmp_path / "missing.jsonl", tmp_path / "run"))
    result = ftl("train", str(recipe))
    assert result.returncode == 2
    assert "missing.jsonl: data file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_is_one_line(demo_data, tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tmp_path / "no-model", demo_data[0], tmp_path / "run"))
    result = ftl("train", str(recipe))
    assert result.returncode == 2
    assert "model.tokenizer: cannot load a tokenizer from" in result.stderr or "model.path" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_model_train_and_eval_commands(demo_data, tmp_path: Path) -> None:
    assert ftl("tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--hidden-size", "64").returncode == 0
    recipe = make_recipe(tmp_path / "m", demo_data[0], tmp_path / "run", train={"max_steps": 3})
    result = ftl("train", str(write_yaml(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    checkpoint = tmp_path / "run/checkpoints/step-3"
    result = ftl("eval", str(checkpoint), "--data", str(demo_data[1]), "--limit", "8")
    assert result.returncode == 0, result.stderr
    assert "exact match:" in result.stdout and "of 8 rows" in result.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_module_under_plain_accelerate_launch(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    recipe = write_yaml(
        tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run", train={"max_steps": 2})
    )
    launcher = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [str(launcher), "launch", "--num_processes", "1", "--cpu", "-m", "ftl.train", str(recipe), "train.max_steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-3"
