"""ftl sweep: the sweep file's errors, a local sweep that prunes, and a sweep killed with -9 in
the middle of a trial that resumes to the same trials, values and best as one never interrupted.

The oracles: each trial's value is its own run's best logged evaluation (metrics.jsonl), a pruned
trial was behind the median of the finished trials at the step it stopped (recomputed here from
their metrics), and the interrupted sweep must equal the uninterrupted one trial for trial.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftl.checkpoints.rundir import read_metrics
from ftl.recipe.load import load_recipe
from ftl.sweep.study import Sweep, table_rows
from conftest import cli_exit_code, make_recipe, write_yaml

SWEEP = {"metric": "eval_loss", "mode": "min", "trials": 6, "seed": 0,
         "sampler": {"type": "tpe", "startup_trials": 3}, "pruner": {"type": "median", "startup_trials": 2},
         "params": {"train.learning_rate": {"low": 1e-6, "high": 3e-2, "log": True}, "method.lora.r": [4, 8]}}


def _recipe(tiny_llama, demo_data, root: Path, **train) -> Path:
    cfg = {"max_steps": 16, "micro_batch_size": 8, "eval_steps": 4, "save_steps": 4, "logging_steps": 4,
           "lr_scheduler": "constant", "seed": 0, **train}
    return write_yaml(root / "recipe.yaml", make_recipe(tiny_llama, demo_data[0], root / "run", eval_path=demo_data[1], train=cfg))


def _evals(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r and r["step"] > 0}


@pytest.fixture(scope="module")
def files(tiny_llama, demo_data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    return _recipe(tiny_llama, demo_data, root), write_yaml(root / "sweep.yaml", SWEEP)


@pytest.fixture(scope="module")
def swept(files) -> Sweep:
    recipe, sweep_file = files
    directory = recipe.parent / "uninterrupted"
    assert cli_exit_code(["sweep", str(recipe), str(sweep_file), "--dir", str(directory)]) == 0
    return Sweep.open(directory)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    ({"params": {"train.learnin_rate": {"low": 1e-5, "high": 1e-2}}},
     r"sweep.yaml:\d+: params.train.learnin_rate: 1e-05 does not make a valid recipe: unknown key 'learnin_rate' at "
     r"train.learnin_rate; did you mean 'learning_rate'\?"),
    ({"params": {"train.learning_rate": {"low": 1e-2, "high": 1e-5}}}, r"sweep.yaml:\d+: params.train.learning_rate: low \(0.01\) must be below high"),
    ({"params": {"train.learning_rate": {"low": 0, "high": 1e-2, "log": True}}}, r"params.train.learning_rate: log: true needs low > 0"),
    ({"params": {"method.lora.r": [8, 0]}}, r"params.method.lora.r: 0 does not make a valid recipe: method.lora.r: Input should be greater than or equal to 1"),
    ({"params": {"method.lora.r": {"low": 4, "high": 16, "step": 0.5}}}, r"params.method.lora.r: an integer range takes an integer step"),
    ({"metric": "eval_accuracy"}, r"sweep.yaml:\d+: metric: 'eval_accuracy' is not logged by this recipe's evaluation; use one of: eval_loss$"),
    ({"metric": "eval_retain_loss"}, r"metric: 'eval_retain_loss' is not logged"),  # an eval set the recipe does not have
    ({"trails": 6}, r"sweep.yaml:\d+: unknown key 'trails' at trails; did you mean 'trials'\?"),
    ({"sampler": "grid"}, r"sampler grid needs choices or a step for every parameter; train.learning_rate has neither"),
])
def test_bad_sweep_files_are_one_line_errors_naming_the_field(files, tmp_path, capsys, change, message):
    import re

    recipe, _ = files
    bad = write_yaml(tmp_path / "sweep.yaml", {**SWEEP, **change})
    assert cli_exit_code(["sweep", str(recipe), str(bad), "--dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "s").exists()  # nothing was started


def test_a_pruner_needs_evaluations_between_steps(tiny_llama, demo_data, tmp_path, capsys):
    recipe = _recipe(tiny_llama, demo_data, tmp_path, eval_steps=None)
    assert cli_exit_code(["sweep", str(recipe), str(write_yaml(tmp_path / "s.yaml", SWEEP))]) == 2
    assert "pruner: median judges trials between evaluations; set train.eval_steps" in capsys.readouterr().err


def test_a_sweep_directory_holds_one_sweep(swept, files, tmp_path, capsys):
    recipe, _ = files
    other = write_yaml(tmp_path / "other.yaml", {**SWEEP, "seed": 1})
    assert cli_exit_code(["sweep", str(recipe), str(other), "--dir", str(swept.root)]) == 2
    assert "holds a sweep with other seed; give this one its own directory (--dir)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a local sweep


@pytest.mark.slow
def test_a_local_sweep_finishes_its_trials_prunes_and_writes_the_best_recipe(swept, capsys):
    rows = table_rows(swept)
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"complete", "pruned"}, rows
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned, rows  # lr 1e-6 .. 3e-2 on a log scale: the slow learners fall behind the median
    trials = {t.number: t for t in swept.trials()}
    for row in rows:
        evals = _evals(swept.trial_dir(row["trial"]))
        assert trials[row["trial"]].intermediate_values == evals  # every evaluation was reported
        if row["state"] == "complete":
            assert row["value"] == min(evals.values()) and max(evals) == 16
    for row in pruned:
        step = row["pruned_at"]
        assert max(_evals(swept.trial_dir(row["trial"]))) == step < 16
        # MedianPruner: behind the median, at that step, of the trials finished before it
        earlier = [r for r in rows if r["trial"] < row["trial"] and r["state"] == "complete"]
        assert len(earlier) >= 2
        assert _evals(swept.trial_dir(row["trial"]))[step] > statistics.median(_evals(swept.trial_dir(r["trial"]))[step] for r in earlier)
    best = min((r for r in rows if r["state"] == "complete"), key=lambda r: r["value"])
    assert swept.best().number == best["trial"]
    recipe = load_recipe(swept.best_recipe)  # a recipe that trains: the base's output.dir, the best trial's values
    assert recipe.train.learning_rate == best["train.learning_rate"] and recipe.method.lora.r == best["method.lora.r"]
    assert recipe.output.dir == swept.base.output.dir
    capsys.readouterr()
    assert cli_exit_code(["sweep", str(swept.root), "--status"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"best: trial {best['trial']}, eval_loss {best['value']:.6g}" in out and "6 of 6 finished" in out, out


@pytest.mark.slow
def test_a_sweep_killed_in_a_trial_resumes_to_the_same_trials_and_best(swept, files, capsys):
    recipe, sweep_file = files
    directory = recipe.parent / "killed"
    # Trial 1 cannot be pruned (two trials must finish first): kill -9 it once it has a checkpoint.
    proc = subprocess.Popen([sys.executable, "-m", "ftl", "sweep", str(recipe), str(sweep_file), "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest, deadline = directory / "trials" / "trial-1" / "checkpoints" / "latest", time.monotonic() + 300
    while not latest.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before trial 1 saved a checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = Sweep.open(directory)
    assert [t.state.name for t in killed.trials()] == ["COMPLETE", "RUNNING"]
    capsys.readouterr()
    assert cli_exit_code(["sweep", str(recipe), str(sweep_file), "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "trial 1: resuming" in out and f"resuming from {directory}/trials/trial-1/checkpoints/step-" in " ".join(out.split())
    resumed = Sweep.open(directory)
    before, after = table_rows(swept), table_rows(resumed)
    for a, b in zip(before, after, strict=True):
        assert {k: a[k] for k in a if k != "value"} == {k: b[k] for k in b if k != "value"}
        assert b["value"] == pytest.approx(a["value"], rel=1e-6)
    assert resumed.best().number == swept.best().number
    assert yaml.safe_load(resumed.best_recipe.read_text())["train"] == yaml.safe_load(swept.best_recipe.read_text())["train"]


@pytest.mark.multiprocess
def test_a_pruned_trial_of_two_processes_stops_on_both_ranks(tiny_llama, demo_data, tmp_path):
    """The main process asks the study; both DDP ranks stop at the same step, with a checkpoint,
    and a later `ftl train` of the trial's recipe finds it complete (pruned) instead of training on."""
    recipe = _recipe(tiny_llama, demo_data, tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    from test_distributed import free_port

    raw["distributed"] = {"strategy": "ddp", "num_processes": 2, "main_process_port": free_port()}
    write_yaml(recipe, raw)
    # grid seed 1 asks lr 1e-2 first; the second trial (1e-7) is behind it at its first evaluation
    sweep_file = write_yaml(tmp_path / "sweep.yaml", {"seed": 1, "sampler": "grid", "pruner": {"type": "median", "startup_trials": 1},
                                                       "params": {"train.learning_rate": [1e-2, 1e-7]}})
    assert cli_exit_code(["sweep", str(recipe), str(sweep_file), "--dir", str(tmp_path / "s")]) == 0
    sweep = Sweep.open(tmp_path / "s")
    rows = table_rows(sweep)
    assert [(r["train.learning_rate"], r["state"], r["pruned_at"]) for r in rows] == [(1e-2, "complete", None), (1e-7, "pruned", 4)]
    pruned = sweep.trial_dir(1)
    assert (pruned / "checkpoints" / "latest").read_text().strip() == "step-4" and max(_evals(pruned)) == 4
    from conftest import ftl_train

    assert ftl_train(str(pruned / "recipe.yaml")) == 0
    assert (pruned / "checkpoints" / "latest").read_text().strip() == "step-4"


def test_a_slurm_sweep_renders_one_array_task_per_trial_left(files, tmp_path, capsys):
    recipe, sweep_file = files
    assert cli_exit_code(["sweep", str(recipe), str(sweep_file), "slurm.time=00:30:00", "--slurm", "--dry-run",
                          "--dir", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"sbatch --parsable {tmp_path}/s/slurm/trial.sbatch")
    script = (tmp_path / "s" / "slurm" / "trial.sbatch").read_text()
    assert "#SBATCH --array=0-5%1\n" in script and f"-m ftl.sweep.task start {tmp_path}/s 0)" in script
    assert f'-m ftl.sweep.task finish {tmp_path}/s "$RUN" "$status"' in script and 'if [ -f "$STOPPED" ]' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_trial_whose_training_fails_is_failed_and_the_sweep_goes_on(tiny_llama, demo_data, tmp_path):
    recipe = _recipe(tiny_llama, demo_data, tmp_path, max_steps=4)
    sweep_file = write_yaml(tmp_path / "sweep.yaml", {"sampler": "grid", "pruner": "none", "seed": 1,
                                                       "params": {"train.learning_rate": [1e-3, 1e9]}})
    assert cli_exit_code(["sweep", str(recipe), str(sweep_file), "method.type=full", "--dir", str(tmp_path / "s")]) == 0
    rows = {r["train.learning_rate"]: r for r in table_rows(Sweep.open(tmp_path / "s"))}
    assert rows[1e-3]["state"] == "complete" and rows[1e9]["state"] == "fail"
    assert "is not finite" in rows[1e9]["failure"] and rows[1e9]["value"] is None
