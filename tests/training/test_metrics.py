"""Where metrics go: metrics.jsonl, TensorBoard (purged on resume), W&B offline, loss.png, summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ftl.recipe.load import validate_recipe
from ftl.training.metrics import MetricsWriter
from ftl.checkpoints.rundir import read_metrics
from conftest import make_recipe


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_mirrors_metrics_and_resume_replaces_rerun_steps(tmp_path):
    writer = MetricsWriter(tmp_path, report_to=["tensorboard"])
    for step in range(1, 6):
        writer.write({"step": step, "loss": 10.0 - step, "lr": 0.1})
    writer.close()
    # Resumed from a checkpoint at step 3: steps 4 and 5 run again with other values.
    writer = MetricsWriter(tmp_path, report_to=["tensorboard"], resume_step=4)
    for step in (4, 5, 6):
        writer.write({"step": step, "loss": 100.0 + step, "lr": 0.1})
    writer.write({"step": 6, "eval_loss": 0.5})
    writer.close()
    assert scalars(tmp_path, "train/loss") == {1: 9.0, 2: 8.0, 3: 7.0, 4: 104.0, 5: 105.0, 6: 106.0}
    assert scalars(tmp_path, "eval/loss") == {6: 0.5}


def test_wandb_offline_run_logs_the_records(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path, report_to=["wandb"], config={"train": {"learning_rate": 0.001}})
    writer.write({"step": 1, "loss": 1.234567, "lr": 0.1})
    writer.close()
    data = _wandb_file(tmp_path / "wandb", b"1.234567")
    assert b"train/loss" in data and b"1.234567" in data and b"learning_rate" in data


def _wandb_file(directory: Path, expected: bytes) -> bytes:
    """The offline run file's bytes once they hold ``expected``: wandb's service process may still be
    flushing it for a moment after ``finish()`` returns (CI once read only its 7-byte header)."""
    import time

    deadline = time.monotonic() + 30
    while True:
        (run_file,) = directory.glob("offline-run-*/run-*.wandb")
        data = run_file.read_bytes()
        if expected in data or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_recipe_report_to_wandb_names_the_project_and_run(tmp_path, tiny_llama, demo_data, monkeypatch):
    from ftl.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = make_recipe(tiny_llama, demo_data[0], tmp_path / "run", train={"max_steps": 2, "micro_batch_size": 4})
    recipe["output"].update(report_to=["wandb"], wandb_project="ftl-test-project", run_name="my-run-name")
    train(validate_recipe(recipe))
    data = _wandb_file(tmp_path / "run" / "wandb", b"train/loss")
    assert b"ftl-test-project" in data and b"my-run-name" in data and b"train/loss" in data
    assert not (tmp_path / "run" / "tensorboard").exists()  # only what report_to lists


def test_training_writes_tensorboard_loss_png_and_summary(tmp_path, tiny_llama, demo_data, capsys):
    import matplotlib.image

    from ftl.train import train

    train_path, eval_path = demo_data
    recipe = validate_recipe(make_recipe(tiny_llama, train_path, tmp_path / "run", eval_path,
                                         train={"max_steps": 6, "micro_batch_size": 4, "eval_steps": 3}))
    train(recipe)
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert scalars(run, "train/loss") == pytest.approx(losses) and len(losses) == 6
    assert set(scalars(run, "eval/loss")) == {0, 3, 6}
    image = matplotlib.image.imread(run / "loss.png")
    assert image.shape[0] > 200 and image.shape[1] > 400
    out = capsys.readouterr().out
    assert "run summary" in out and f"{losses[1]:.4f} -> {losses[6]:.4f}" in out and "peak memory" in out


def test_wandb_without_the_package_is_a_recipe_error(tmp_path, monkeypatch):
    import importlib.util

    from ftl.recipe.schema import RecipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match="output.report_to: wandb is not installed"):
        validate_recipe(make_recipe(tmp_path, tmp_path / "t.jsonl", tmp_path / "run", output={"dir": str(tmp_path), "report_to": ["wandb"]}))


def test_summary_means_windows_and_the_progress_shows_ftls_eta(capsys):
    """One logged step's loss is noise: the summary compares means of the first and last windows of
    logged steps; the progress line shows the ETA ftl computes (eta_s), however far apart steps are."""
    from ftl.training.metrics import TrainingProgress, smoothed, summary_table
    from ftl.training.trainer import RunSummary
    from ftl.console import console

    records = [{"step": s, "loss": 5.0 if s % 2 else 1.0, "tokens_per_s": 1.0, "tflops_per_device": 0.0,
                "peak_memory_gib": 0.1, "reward_accuracy": 0.5, "reward_margin": 0.2} for s in range(1, 41)]
    console.print(summary_table(records, RunSummary(total_steps=40, steps=40)))
    out = " ".join(capsys.readouterr().out.split())
    assert "train loss 3.0000 -> 3.0000 (means of the first and last 4 logged steps)" in out  # not 5 -> 1
    assert "reward accuracy, margin 50.0%, 0.200 (last 4 logged steps)" in out
    progress = TrainingProgress(100)
    progress.update(10, {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 5.0, "peak_memory_gib": 0.1, "eta_s": 3725.0})
    assert "eta 1:02:05" in capsys.readouterr().out
    progress.update(11, {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 5.0, "peak_memory_gib": 0.1, "eta_s": 60.0,
                         "reward_margin": 0.25, "kl": 0.125})  # KTO: margin and its reference point, no accuracy
    shown = capsys.readouterr().out
    assert "margin 0.250" in shown and "kl 0.125" in shown and "reward acc" not in shown
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no ramp from 0
