"""The ``ftl`` command as a user runs it: separate processes, real exit codes, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftl.recipe.load import load_recipe
from conftest import make_recipe, write_yaml

ROOT = Path(__file__).resolve().parent.parent


def ftl(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ftl", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_validate_every_recipe() -> None:
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
    result = ftl("validate", "-q", "--no-check-files", *recipes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(recipes)


def test_validate_prints_resolved_recipe() -> None:
    result = ftl("validate", "recipes/demo-tiny.yaml", "train.learning_rate=5e-4", "--no-check-files")
    assert result.returncode == 0, result.stderr
    assert "learning_rate: 0.0005" in result.stdout
    assert "adam_beta2: 0.999" not in result.stdout and "ftl validate --full" in result.stdout  # defaults: with --full
    full = ftl("validate", "recipes/demo-tiny.yaml", "--full", "--no-check-files")
    assert full.returncode == 0 and "adam_beta2: 0.999" in full.stdout


def test_validate_checks_local_files_at_their_line_and_expands_ftl_artifacts(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    """A missing data file or model directory fails `ftl validate` (not `train` a minute later),
    named at its file:line; $FTL_ARTIFACTS and ~ are expanded; a hub id is not a local path."""
    text = (f"model:\n  path: $FTL_ARTIFACTS/models/tiny\n  dtype: float32\ndata:\n  train: {{path: {demo_data[0]}}}\n"
            f"  eval: {{path: {tmp_path}/no-such.jsonl}}\noutput:\n  dir: {tmp_path}/run\n")
    (tmp_path / "r.yaml").write_text(text)
    env = {"FTL_ARTIFACTS": str(tmp_path / "artifacts")}
    result = subprocess.run([sys.executable, "-m", "ftl", "validate", "-q", str(tmp_path / "r.yaml")], capture_output=True,
                            text=True, env={**os.environ, **env, "COLUMNS": "300"})
    assert result.returncode == 2
    assert [line.split(": ")[1] for line in result.stderr.strip().splitlines()] == [f"{tmp_path}/r.yaml:2", f"{tmp_path}/r.yaml:6"], result.stderr
    assert "model.path: $FTL_ARTIFACTS/models/tiny: model directory not found" in result.stderr
    (tmp_path / "artifacts" / "models").mkdir(parents=True)
    (tmp_path / "artifacts" / "models" / "tiny").symlink_to(tiny_llama)
    result = subprocess.run([sys.executable, "-m", "ftl", "validate", str(tmp_path / "r.yaml"), f"data.eval.path={demo_data[1]}"],
                            capture_output=True, text=True, env={**os.environ, **env, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    assert f"path: {tmp_path}/artifacts/models/tiny" in result.stdout or f"path: {tiny_llama}" in result.stdout
    result = ftl("validate", "-q", str(tmp_path / "r.yaml"), "model.path=some-org/some-model", f"data.eval.path={demo_data[1]}")
    assert result.returncode == 0, result.stderr  # a hub id: not checked here


def test_misspelt_key_is_one_line_without_traceback(tmp_path: Path) -> None:
    text = (ROOT / "recipes/demo-tiny.yaml").read_text().replace("    r: 32", "    rnak: 32")
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
    # --num_processes 2 without --multi_gpu starts ONE process: refused, not trained as if it were two
    result = subprocess.run(
        [str(launcher), "launch", "--num_processes", "2", "--cpu", "-m", "ftl.train", str(recipe), "train.max_steps=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "accelerate launch was asked for several processes but started only this one" in result.stderr
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-3"


def test_user_strings_are_printed_verbatim_not_as_markup(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run"))
    result = ftl("validate", str(recipe), "output.run_name='[/red]'", "slurm.job_name='[bold]x[/bold]'")
    assert result.returncode == 0, result.stderr
    assert "run_name: '[/red]'" in result.stdout and "job_name: '[bold]x[/bold]'" in result.stdout
    result = ftl("validate", str(recipe), "output.[/red]=1")
    assert result.returncode == 2 and "unknown key '[/red]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["eval", "x", "--data", "d.jsonl", "--limit", "-1"], "--limit: must be at least 1 (got -1)"),
    (["tiny-model", "out", "--hidden-size", "0"], "--hidden-size: must be at least 8 (got 0)"),
    (["tiny-model", "out", "--hidden-size", "12"], "--hidden-size: 12 is not a multiple of 8"),
    (["export", "nowhere", "--max-shard-size", "lots"], "--max-shard-size: 'lots' is not a size"),
    (["export", "/nonexistent/run"], "/nonexistent/run: not a run directory, a checkpoint"),
])
def test_bad_command_arguments_exit_2_with_one_line(tmp_path: Path, args, message) -> None:
    result = ftl(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_export_out_that_is_a_file(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    from ftl.train import train
    from ftl.recipe.load import validate_recipe

    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "run", train={"max_steps": 1})))
    (tmp_path / "taken").write_text("mine")
    result = ftl("export", str(tmp_path / "run"), "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and "is a file; choose a directory" in result.stderr
    assert (tmp_path / "taken").read_text() == "mine"


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("signal_name, delay", [("SIGTERM", 0.0), ("SIGUSR1", 0.0), ("SIGTERM", 1.5)])
def test_a_stop_signal_before_training_began_exits_as_stopped(tiny_llama: Path, demo_data, tmp_path: Path, signal_name, delay) -> None:
    """The signal arrives as soon as ftl has its handler in (or 1.5 s later), while imports and the
    model load are still under way. (Before the interpreter has run ftl's first line, nothing can
    catch it; waiting for the handler keeps this test from depending on the machine's load.)"""
    import signal
    import time

    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-m", "ftl", "train", str(recipe)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signum = getattr(signal, signal_name)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signum):
        assert proc.poll() is None and time.monotonic() < deadline, "ftl never installed its stop handler"
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["demo-data"], ["tiny-model", "--hidden-size", "32"], ["demo", "--tiny", "--workdir"]])
def test_helper_commands_refuse_a_non_empty_directory_without_force(tmp_path, command, capsys):
    """demo-data, tiny-model and demo write into a directory of their own: a user's files there
    (a data/train.jsonl, a model) stay as they are unless --force says otherwise."""
    from conftest import cli_exit_code

    target = tmp_path / "mine"
    (target / "data").mkdir(parents=True)
    (target / "train.jsonl").write_text('{"mine": 1}\n')
    (target / "data" / "train.jsonl").write_text('{"mine": 2}\n')
    argv = [command[0], *command[1:], str(target)] if command[0] != "demo" else [*command, str(target)]
    assert cli_exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err
    assert (target / "train.jsonl").read_text() == '{"mine": 1}\n' and (target / "data" / "train.jsonl").read_text() == '{"mine": 2}\n'
    assert sorted(p.name for p in target.rglob("*")) == ["data", "train.jsonl", "train.jsonl"]
    if command[0] == "demo-data":
        assert cli_exit_code([*argv, "--force", "--train-rows", "3", "--eval-rows", "2"]) == 0
        assert (target / "train.jsonl").read_text() != '{"mine": 1}\n'


@pytest.mark.parametrize("argv, message", [
    (["--objective", "kto"], "--objective kto: no demo shows it; choose sft or dpo"),
    (["--objective", "grpo-ish"], "--objective grpo-ish: no demo shows it; choose sft or dpo"),
    (["--objective", "dpo", "--tiny"], "--tiny: the dpo demo runs on the real SmolLM2 only"),
])
def test_demo_objective_is_resolved_through_the_objectives(tmp_path, argv, message, capsys):
    """``ftl demo --objective`` names an objective; one without a demo is a one-line error that lists
    those with one, before anything is written."""
    from conftest import cli_exit_code

    assert cli_exit_code(["demo", *argv, "--workdir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_version_log_levels_and_commands_in_order_of_use() -> None:
    from importlib.metadata import version

    result = ftl("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ftl {version('ftl')}"
    result = ftl("--log-level", "LOUD", "validate", "x.yaml")
    assert result.returncode == 2 and "choose from 'DEBUG', 'INFO', 'WARNING', 'ERROR'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "ftl", "validate", "x.yaml"], capture_output=True, text=True,
                            env={**os.environ, "FTL_LOG_LEVEL": "loud"})
    assert result.returncode == 2 and "FTL_LOG_LEVEL: 'LOUD' is not a log level" in result.stderr and "Traceback" not in result.stderr
    listed = [line.split()[0] for line in ftl("--help").stdout.splitlines() if line.startswith("    ") and line.split()]
    assert listed[:8] == ["init", "validate", "preprocess", "plan", "train", "eval", "export", "chat"], listed
    assert "key.sub=value" in ftl("train", "--help").stdout


def test_a_run_prints_nothing_about_the_libraries_themselves(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    """From the checkout's root (where `kernels/` could pass for Hugging Face's `kernels` package), a
    QLoRA run's output holds no bitsandbytes install advice, no library FutureWarnings and no bars
    for datasets' bookkeeping."""
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run", method={"type": "qlora"},
                                                         train={"max_steps": 1}))
    result = ftl("train", str(recipe))
    assert result.returncode == 0, result.stderr
    for noise in ("pip install kernels", "FutureWarning", "Generating train split", "Filter:", "ds_accelerator"):
        assert noise not in result.stdout + result.stderr, noise


@pytest.mark.parametrize("kind", ["chat", "preference"])
def test_init_writes_a_starter_recipe_that_trains(tiny_llama: Path, tmp_path: Path, kind: str, capsys) -> None:
    """`ftl init MODEL DATA`: the format read from the data, a max_length that fits it, DPO for pairs;
    the recipe validates and trains as written; an existing file is kept unless --force."""
    from conftest import cli_exit_code, write_jsonl

    if kind == "chat":
        rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]
    else:
        rows = [{"prompt": f"q{i}", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "recipe.yaml"
    assert cli_exit_code(["init", str(tiny_llama), str(data), "--out", str(out)]) == 0
    recipe = load_recipe(out)
    assert recipe.data.train[0].format == kind and recipe.method.objective == ("dpo" if kind == "preference" else "sft")
    assert recipe.data.max_length == 64 and "# format read from the first row" in out.read_text()
    assert cli_exit_code(["train", str(out), f"output.dir={tmp_path / 'run'}", "train.max_steps=1", "train.micro_batch_size=2",
                          "train.gradient_accumulation_steps=1"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-1").is_dir()
    capsys.readouterr()
    assert cli_exit_code(["init", str(tiny_llama), str(data), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
