"""The run directory loses nothing: a failed start changes no file of an earlier run, unusable
checkpoints are moved aside (never deleted), and a torn metrics line does not stop a resume."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ftl.config import validate_recipe
from ftl.errors import UserError
from ftl.metrics import read_metrics
from ftl.train import TrainError, train
from conftest import make_recipe


def _recipe(model: Path, data, run_dir: Path, **sections):
    return validate_recipe(make_recipe(model, data[0], run_dir, **sections))


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run directory and its sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_llama, demo_data, tmp_path_factory) -> Path:
    """A finished 2-step LoRA run (checkpoints at steps 1 and 2) to copy and damage."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(_recipe(tiny_llama, demo_data, run_dir, train={"max_steps": 2, "save_steps": 1}))
    return run_dir


@pytest.fixture
def run(finished, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    # The recipe names its own directory: point it at the copy.
    (copy / "recipe.yaml").write_text((copy / "recipe.yaml").read_text().replace(str(finished), str(copy)))
    return copy


@pytest.mark.parametrize("bad", [
    {"data": {"train": {"path": "/nonexistent/train.jsonl"}}},
    {"model": {"path": "/nonexistent/model"}},
    {"method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["no_such_module"]}}},
])
@pytest.mark.parametrize("mode", [{"resume": "auto"}, {"resume": "never", "overwrite": True}])
def test_a_failed_start_changes_no_file_of_the_earlier_run(tiny_llama, demo_data, run, bad, mode):
    before = _snapshot(run)
    sections = {"train": {"max_steps": 4, "resume": mode["resume"]}, "output": {"overwrite": mode.get("overwrite", False)}}
    for name, values in bad.items():
        sections.setdefault(name, {}).update(values)
    raw = make_recipe(tiny_llama, demo_data[0], run, **sections)
    with pytest.raises(UserError):
        train(validate_recipe(raw))
    after = {k: v for k, v in _snapshot(run).items() if not k.startswith("data/")}  # the data cache may grow
    assert after == {k: v for k, v in before.items() if not k.startswith("data/")}


def test_unverifiable_checkpoints_are_moved_aside_with_user_files(tiny_llama, demo_data, run, caplog):
    for step in (1, 2):
        (run / f"checkpoints/step-{step}/manifest.json").write_text("{not json")
    (run / "checkpoints/notes.txt").write_text("mine")
    old_metrics = (run / "metrics.jsonl").read_text()
    with caplog.at_level("WARNING"):
        summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 2}))
    assert summary.resumed_from is None and summary.steps == 2
    [aside] = list((run / "set-aside").iterdir())
    assert (aside / "checkpoints/notes.txt").read_text() == "mine"
    assert (aside / "checkpoints/step-1").is_dir() and (aside / "metrics.jsonl").read_text() == old_metrics
    [warning] = [r.getMessage() for r in caplog.records if "moved it and metrics.jsonl" in r.getMessage()]
    assert "step-1, step-2" in warning and str(aside) in warning


def test_a_broken_newer_checkpoint_is_moved_aside_not_overwritten(tiny_llama, demo_data, run):
    broken = run / "checkpoints/step-2/adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-10])
    damaged = broken.read_bytes()
    summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 2, "save_steps": 1}))
    assert summary.resumed_from.endswith("step-1")
    [aside] = list((run / "set-aside").iterdir())
    assert (aside / "step-2/adapter_model.safetensors").read_bytes() == damaged
    assert (run / "checkpoints/step-2/manifest.json").is_file()  # saved again by the resumed run


def test_a_torn_metrics_line_does_not_stop_a_resume(tiny_llama, demo_data, run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 3}))
    assert summary.steps == 3 and summary.resumed_from.endswith("step-2")
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("change, key", [
    ({"method": {"type": "full"}}, "method.type"),
    ({"method": {"type": "lora", "lora": {"r": 4, "alpha": 16, "dropout": 0.0}}}, "method.lora.r"),
])
def test_resuming_with_another_method_is_refused(tiny_llama, demo_data, run, change, key):
    before = _snapshot(run)
    with pytest.raises(TrainError, match=f"{key}: is .* but .*step-2 was trained with"):
        train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 4}, **change))
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", [
    lambda c: (c / "manifest.json").write_text('{"files": [1, 2]}'),
    lambda c: (c / "manifest.json").write_text('{"files": {"x": {"size": 1}}}'),
    lambda c: (c / "trainer_state.json").write_text('{"epoch": 0}'),
    lambda c: (c.parent / "latest").unlink() or (c.parent / "latest").mkdir(),
    lambda c: (c.parent / "latest").write_bytes(b"\xff\xfe"),
])
def test_damaged_checkpoint_files_give_a_clear_fallback(tiny_llama, demo_data, run, damage):
    damage(run / "checkpoints/step-2")
    summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 2}))
    assert summary.steps == 2 and summary.resumed_from is not None
