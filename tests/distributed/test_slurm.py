"""Slurm: the generated script, and jobs on a real cluster (slurmctld + two slurmd on this machine).

The cluster tests bring the cluster up once (``tests/slurm/cluster.sh up``: installs Debian's
Slurm and munge if missing; needs root) and take it down afterwards, leaving no daemons behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import validate_recipe
from ftl.checkpoints.rundir import read_metrics
from ftl.distributed.slurm import SlurmError, render
from conftest import ftl_train, make_recipe, write_yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_CONF = os.environ.get("FTL_SLURM_DIR", "/tmp/ftl-slurm") + "/slurm.conf"


# Optimizer steps of the jobs that finish (~10 s of training), and of the one whose time limit is cut
# while it trains: ~2 minutes on the 2-core test machine (~20 steps/s), which outlasts the up to
# ~40 s that slurmctld takes to send a time-limit warning once it is due (30 s between its time
# checks) even on a machine twice as fast. That job is cancelled once it has resumed and trained on.
SHORT, LONG = 200, 2500


def slurm_recipe(tiny_llama, demo_data, run_dir: Path, steps: int = SHORT, scheduler: str = "linear", **slurm) -> dict:
    train_cfg = {"max_steps": steps, "micro_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 20,
                 "save_steps": 40, "seed": 0, "lr_scheduler": scheduler}
    return make_recipe(tiny_llama, demo_data[0], run_dir, train=train_cfg,
                       distributed={"strategy": "ddp", "num_processes": 1}, output={"keep_last": 2},
                       slurm={"nodes": 2, "cpus_per_task": 1, "time": "00:10:00", "signal_grace": 60, **slurm})


# ----------------------------------------------------------------------------- the script


def test_recipe_values_reach_the_shell_quoted(tiny_llama, demo_data, tmp_path):
    recipe = validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "run", job_name="x; rm -rf ~",
                                          partition="gpu$(touch /tmp/pwned)", env={"HF_HOME": "a b; echo hi"}))
    script = render(recipe)
    assert "#SBATCH --job-name='x; rm -rf ~'" in script
    assert "#SBATCH --partition='gpu$(touch /tmp/pwned)'" in script
    assert "export HF_HOME='a b; echo hi'" in script
    assert "#SBATCH --signal=B:USR1@60" in script and "#SBATCH --nodes=2" in script
    # bash parses it, and the quoted values are never executed.
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_newlines_in_slurm_values_are_refused(tiny_llama, demo_data, tmp_path):
    recipe = validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "run", job_name="x\nrm -rf ~"))
    with pytest.raises(SlurmError, match="slurm.job_name: control characters"):
        render(recipe)


@pytest.mark.parametrize("key", ["A=1;touch /tmp/pwned;B", "A$(touch /tmp/pwned)", "A`touch /tmp/pwned`", "A\ntouch /tmp/pwned", "1A"])
def test_slurm_env_names_are_refused_unless_names(tiny_llama, demo_data, tmp_path, key):
    raw = slurm_recipe(tiny_llama, demo_data, tmp_path / "run", env={key: "x"})
    with pytest.raises(RecipeError, match="slurm.env: .* is not an environment variable name"):
        validate_recipe(raw)


def test_a_newline_in_output_dir_cannot_reach_the_shell(tiny_llama, demo_data, tmp_path):
    with pytest.raises(RecipeError, match="output.dir: .*control characters"):
        validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "o\ntouch /tmp/pwned\n"))
    # A path with shell syntax but no line break is one quoted word everywhere, comments included.
    recipe = validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "o;touch $(x)"))
    script = render(recipe)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert all(line.startswith("#") or "o;touch $(x)" not in line or "'" in line for line in script.splitlines())


def test_slurm_settings_are_checked(tiny_llama, demo_data, tmp_path):
    with pytest.raises(RecipeError, match="slurm.signal_grace"):
        validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "run", time="00:05:00", signal_grace=300))
    with pytest.raises(RecipeError, match="slurm.time"):
        validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "run", time="soon"))
    mismatch = slurm_recipe(tiny_llama, demo_data, tmp_path / "run", gpus_per_node=8)
    mismatch["distributed"]["num_processes"] = 4
    with pytest.raises(RecipeError, match="distributed.num_processes: is 4 but slurm.gpus_per_node is 8"):
        validate_recipe(mismatch)
    recipe = validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "run", gpus_per_node=8))
    assert (recipe.distributed.num_machines, recipe.distributed.num_processes) == (2, 8)
    script = render(recipe)
    assert "#SBATCH --gpus-per-node=8" in script and 'distributed.machine_rank="$SLURM_NODEID"' in script


# ----------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start a cluster and need root (run them with -m 'not slurm' otherwise)")
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    os.environ["SLURM_CONF"] = SLURM_CONF
    yield
    down = subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True)
    os.environ.pop("SLURM_CONF", None)
    assert down.returncode == 0, down.stdout + down.stderr
    for daemon in ("slurmctld", "slurmd", "slurmstepd", "munged"):
        assert subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 1, f"{daemon} still running"
    assert "n1 n2" not in Path("/etc/hosts").read_text()


def ftl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftl", *args], capture_output=True, text=True, timeout=600)


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_for(job: str, states: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state.get("JobState") in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} did not reach {states}: {job_state(job)}")


def wait_for_step(run_dir: Path, job: str, step: int, timeout: float = 400) -> None:
    """Until the job's run has logged ``step`` (its training is under way)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics))):
        assert time.monotonic() < deadline, job_state(job)
        time.sleep(0.5)


def trace(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def final_loss(run_dir: Path) -> tuple[int, float]:
    return max(trace(run_dir).items())


@pytest.fixture(scope="module")
def reference(tiny_llama, demo_data, tmp_path_factory):
    """Losses by step of the same recipe run locally by `ftl train`: 2 processes, uninterrupted."""
    cache: dict[tuple[int, str], dict[int, float]] = {}

    def get(steps: int, scheduler: str = "linear") -> dict[int, float]:
        if (steps, scheduler) not in cache:
            run_dir = tmp_path_factory.mktemp("local") / "run"
            raw = slurm_recipe(tiny_llama, demo_data, run_dir, steps, scheduler)
            raw["distributed"] = {"strategy": "ddp", "num_processes": 2, "main_process_port": 29731}
            raw.pop("slurm")
            assert ftl_train(str(write_yaml(run_dir.parent / "r.yaml", raw))) == 0
            cache[steps, scheduler] = trace(run_dir)
        return cache[steps, scheduler]

    return get


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_two_node_job_trains_and_export_runs_after(cluster, reference, tiny_llama, demo_data, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_yaml(tmp_path / "r.yaml", slurm_recipe(tiny_llama, demo_data, run_dir, port=29741))
    out = ftl("slurm", "submit", str(recipe), "--export")
    assert out.returncode == 0, out.stderr
    train_job, export_job = out.stdout.split()[-2:]
    assert job_state(export_job)["JobState"] == "PENDING"  # waits for training
    assert wait_for(train_job, {"COMPLETED", "FAILED", "CANCELLED"}, 400)["JobState"] == "COMPLETED"
    state = wait_for(export_job, {"COMPLETED", "FAILED", "CANCELLED"}, 300)
    assert state["JobState"] == "COMPLETED"
    logs = "".join(p.read_text() for p in (run_dir / "slurm").glob(f"*-{train_job}-*.out"))
    assert "SLURMD_NODENAME=n1 SLURM_NODEID=0" in logs and "SLURMD_NODENAME=n2 SLURM_NODEID=1" in logs
    assert "2 process(es) (ddp)" in logs  # one process group over both nodes
    assert final_loss(run_dir) == pytest.approx(max(reference(SHORT).items()), rel=1e-5)
    assert json.loads((run_dir / "export" / "verify.json").read_text())["passed"]
    # The export job started only after training had finished.
    assert int(state["StartTime"].replace("-", "").replace(":", "").replace("T", "")) >= int(
        job_state(train_job)["EndTime"].replace("-", "").replace(":", "").replace("T", ""))


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_time_limit_checkpoints_requeues_and_resumes(cluster, reference, tiny_llama, demo_data, tmp_path):
    """The time-limit warning (USR1, ``signal_grace`` before the limit) lands mid-training: the ranks
    checkpoint, the job requeues itself and resumes with the uninterrupted run's losses.

    So that the test does not depend on how fast this machine trains, the job starts with a long
    limit, which is cut (as an admin's ``scontrol update`` does) once training is under way, to within
    the grace period: slurmctld sends the warning at its next time check. While the job waits to be
    requeued, the limit is raised again. With a constant learning rate, the uninterrupted run needs
    only the steps the job has trained when it is cancelled, 60 or more after it resumed (how a
    requeued job runs to its end is the next test's).
    """
    run_dir = tmp_path / "run"
    recipe = write_yaml(tmp_path / "r.yaml", slurm_recipe(tiny_llama, demo_data, run_dir, LONG, "constant", time="00:10:00",
                                                          signal_grace=120, port=29751, max_restarts=2))
    out = ftl("slurm", "submit", str(recipe))
    assert out.returncode == 0, out.stderr
    job = out.stdout.split()[-1]
    wait_for_step(run_dir, job, 40)
    running_s = sum(int(x) * f for x, f in zip(job_state(job)["RunTime"].split(":"), (3600, 60, 1)))
    # Whole minutes that leave 60-120 s: within the 120 s grace, so the warning is due now.
    assert subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={running_s // 60 + 2}"]).returncode == 0
    log_path = run_dir / "slurm" / f"ftl-{job}.out"
    deadline = time.monotonic() + 300
    while not (log_path.exists() and "requeueing" in log_path.read_text()):
        assert time.monotonic() < deadline, job_state(job)
        time.sleep(1)
    assert subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"]).returncode == 0
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 40 < stopped_at < LONG - 200
    wait_for_step(run_dir, job, stopped_at + 60)
    # scancel's TERM reads as a preemption to the batch script, which would requeue the job: make it
    # not requeueable first, so that it ends here.
    assert subprocess.run(["scontrol", "update", f"JobId={job}", "Requeue=0"]).returncode == 0
    assert subprocess.run(["scancel", job]).returncode == 0
    state = wait_for(job, {"CANCELLED", "COMPLETED", "FAILED"}, 120)
    log = log_path.read_text()
    assert state["Restarts"] == "1" and "attempt 1 on" in log and "USR1 received" in log, log[-3000:]
    assert state["JobState"] == "CANCELLED", log[-3000:]
    node_logs = "".join(p.read_text() for p in (run_dir / "slurm").glob(f"*-{job}-*.out"))
    assert "resuming from" in node_logs and "stopped by SIGUSR1" in node_logs
    trained = {step: loss for step, loss in trace(run_dir).items() if step <= stopped_at + 60}
    expected = reference(max(trained), "constant")
    assert sorted(trained) == sorted(expected)
    for step, loss in expected.items():
        assert trained[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_requeue_from_outside_resumes(cluster, reference, tiny_llama, demo_data, tmp_path):
    """`scontrol requeue` by an admin (SIGTERM to the job): the run resumes and ends the same."""
    run_dir = tmp_path / "run"
    recipe = write_yaml(tmp_path / "r.yaml", slurm_recipe(tiny_llama, demo_data, run_dir, port=29761))
    job = ftl("slurm", "submit", str(recipe)).stdout.split()[-1]
    wait_for_step(run_dir, job, 40, timeout=300)
    assert subprocess.run(["scontrol", "requeue", job]).returncode == 0
    state = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, 600)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1"
    assert final_loss(run_dir) == pytest.approx(max(reference(SHORT).items()), rel=1e-5)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{SHORT}"


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_a_preempted_two_node_dpo_job_resumes_to_the_local_trace(cluster, tiny_llama, tmp_path):
    """Full DPO with its frozen reference sharded by ZeRO-3 over two nodes, pairs packed: requeued
    mid-run (SIGTERM, as a preemption), it resumes from its checkpoint (the policy; the reference is
    the starting model again) and logs the losses of the same recipe run locally without a stop."""
    from test_preference import _varied_pairs

    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", _varied_pairs(64))

    def recipe(run_dir: Path, port: int) -> dict:
        return make_recipe(tiny_llama, pairs, run_dir, data={"train": {"path": str(pairs), "format": "preference"}, "packing": True},
                           method={"type": "full", "objective": "dpo"}, preference={"reference": "model"},
                           train={"max_steps": 160, "micro_batch_size": 2, "learning_rate": 1e-4, "logging_steps": 10,
                                  "save_steps": 20, "seed": 0, "lr_scheduler": "linear"},
                           distributed={"strategy": "zero3", "num_processes": 1},
                           output={"keep_last": 2},
                           slurm={"nodes": 2, "cpus_per_task": 1, "time": "00:10:00", "signal_grace": 60, "port": port})

    local = recipe(tmp_path / "local", 29771)
    local["distributed"].update(num_processes=2, main_process_port=29771)
    local.pop("slurm")
    assert ftl_train(str(write_yaml(tmp_path / "local.yaml", local))) == 0
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "local" / "metrics.jsonl") if "loss" in r}

    run_dir = tmp_path / "run"
    job = ftl("slurm", "submit", str(write_yaml(tmp_path / "r.yaml", recipe(run_dir, 29781)))).stdout.split()[-1]
    wait_for_step(run_dir, job, 40)
    assert subprocess.run(["scontrol", "requeue", job]).returncode == 0
    state = wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, 900)
    node_logs = "".join(p.read_text() for p in (run_dir / "slurm").glob(f"*-{job}-*.out"))
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", node_logs[-3000:]
    assert "resuming from" in node_logs and "2 process(es) (zero3)" in node_logs and "padding-free" in node_logs
    trace = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(trace) == sorted(expected) and len(expected) == 16
    for step, loss in expected.items():
        assert trace[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_a_sweep_runs_as_a_job_array_prunes_and_a_requeued_trial_resumes(cluster, tiny_llama, demo_data, tmp_path):
    """`ftl sweep --slurm`: 6 trials, 2 array tasks at a time, each trial a 1-node job of its own
    that shares the study (SQLite). A task requeued from outside while it trains takes back its
    trial and resumes it from its checkpoint; the random sampler's draws follow the task ids (seed
    0: tasks 2, 3 and 5 draw rates below 1e-5, which the median pruner stops once two finished)."""
    from ftl.sweep.study import Sweep, table_rows

    raw = slurm_recipe(tiny_llama, demo_data, tmp_path / "run", 120, "constant", nodes=1)
    raw["data"]["eval"] = {"path": str(demo_data[1])}
    raw["train"].update(eval_steps=20, save_steps=20)
    raw["distributed"] = {"strategy": "single"}
    recipe = write_yaml(tmp_path / "r.yaml", raw)
    sweep_file = write_yaml(tmp_path / "sweep.yaml", {
        "trials": 6, "seed": 0, "parallel": 2, "sampler": "random", "pruner": {"type": "median", "startup_trials": 2},
        "params": {"train.learning_rate": {"low": 1e-6, "high": 3e-2, "log": True}, "method.lora.r": [4, 8]}})
    out = ftl("sweep", str(recipe), str(sweep_file), "--slurm", "--dir", str(tmp_path / "sweep"))
    assert out.returncode == 0, out.stderr
    array = out.stdout.split()[-1]
    # Requeue the first trial that has saved a checkpoint (tasks 0 and 1 cannot be pruned: none had finished).
    deadline, requeued = time.monotonic() + 600, None
    while requeued is None:
        assert time.monotonic() < deadline, job_state(array)
        time.sleep(0.5)
        if not (tmp_path / "sweep" / "study.db").exists():
            continue
        sweep = Sweep.open(tmp_path / "sweep")
        for trial in sweep.trials():
            latest = sweep.trial_dir(trial.number) / "checkpoints" / "latest"
            if trial.state.name == "RUNNING" and latest.is_file() and latest.read_text().strip() == "step-20":
                requeued = trial
                break
    element = requeued.user_attrs["owner"].removeprefix("slurm:")
    assert subprocess.run(["scontrol", "requeue", element]).returncode == 0
    while len(Sweep.open(tmp_path / "sweep").finished()) < 6:
        assert time.monotonic() < deadline + 300, job_state(array)
        time.sleep(2)
    sweep = Sweep.open(tmp_path / "sweep")
    rows = {r["trial"]: r for r in table_rows(sweep)}
    assert sorted(r["owner"] for r in rows.values()) == sorted(f"slurm:{array}_{i}" for i in range(6))
    assert {r["state"] for r in rows.values()} <= {"complete", "pruned"}, rows
    assert [r for r in rows.values() if r["state"] == "pruned"], rows
    assert wait_for(element, {"COMPLETED"}, 60)["Restarts"] == "1"
    resumed = sweep.trial_dir(requeued.number)
    assert rows[requeued.number]["state"] == "complete" and rows[requeued.number]["evals"] == 6
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(resumed / "metrics.jsonl") if "eval_loss" in r and r["step"] > 0}
    assert sorted(evals) == [20, 40, 60, 80, 100, 120] and rows[requeued.number]["value"] == min(evals.values())
    node_logs = "".join(p.read_text() for p in (tmp_path / "sweep" / "slurm").glob("*-node*.out"))
    assert f"resumingfrom{resumed}/checkpoints/step-" in re.sub(r"\s", "", node_logs)  # (rich wraps long paths)
    assert sweep.best_recipe.is_file()


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_renders_the_job_its_shape_says(path):
    """The job's nodes are the recipe's machines and its GPUs per node the processes per machine
    (recipes/llama3.1-70b-qlora-2x8.yaml, the README's example, has no slurm section: 2 nodes x 8 GPUs)."""
    from ftl.recipe.load import load_recipe

    recipe = load_recipe(path)
    script = render(recipe)
    dist = recipe.distributed
    assert f"#SBATCH --nodes={dist.num_machines}\n" in script
    gpus = [line for line in script.splitlines() if line.startswith("#SBATCH --gpus-per-node=")]
    assert gpus == ([f"#SBATCH --gpus-per-node={dist.num_processes}"] if dist.num_processes > 1 else []), gpus
    if path.name == "llama3.1-70b-qlora-2x8.yaml":
        assert (dist.num_machines, dist.num_processes) == (2, 8)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_recipe_that_asks_for_no_gpus_gets_none(tiny_llama, demo_data, tmp_path):
    """slurm.gpus_per_node: 0 (a CPU cluster) is kept; a 1-node job of 2 machines follows the machines."""
    raw = slurm_recipe(tiny_llama, demo_data, tmp_path / "run", gpus_per_node=0, nodes=1)
    raw["distributed"].update(num_processes=2, num_machines=2)
    script = render(validate_recipe(raw))
    assert "#SBATCH --nodes=2\n" in script and "--gpus-per-node" not in script


def test_render_writes_nothing_and_a_dry_run_writes_what_the_script_reads(tiny_llama, demo_data, tmp_path, capsys):
    """`render` says the script reads a recipe copy it does not write; `submit --dry-run` writes that
    copy and the script and prints the sbatch command; a job that sets up its own environment runs
    that environment's python."""
    from conftest import cli_exit_code, write_yaml

    recipe = write_yaml(tmp_path / "r.yaml", slurm_recipe(tiny_llama, demo_data, tmp_path / "run"))
    capsys.readouterr()
    assert cli_exit_code(["slurm", "render", str(recipe)]) == 0
    out = capsys.readouterr()
    assert f"PYTHON={sys.executable}" in out.out and "render writes nothing" in out.err
    assert not (tmp_path / "run").exists()
    assert cli_exit_code(["slurm", "submit", str(recipe), "--dry-run", "--export"]) == 0
    printed = capsys.readouterr().out
    slurm_dir = tmp_path / "run" / "slurm"
    assert f"sbatch --parsable {slurm_dir}/train.sbatch" in printed and "afterok:" in printed
    assert {p.name for p in slurm_dir.iterdir()} == {"recipe.yaml", "train.sbatch", "export.sbatch"}
    assert f"RECIPE={slurm_dir}/recipe.yaml" in (slurm_dir / "train.sbatch").read_text()
    with_setup = validate_recipe(slurm_recipe(tiny_llama, demo_data, tmp_path / "run", setup=["source ~/venv/bin/activate"]))
    assert "PYTHON=python3\n" in render(with_setup)
