"""``ftl sweep --slurm``: the sweep as one Slurm job array, each task one trial.

The array's script is the training script (``slurm/train.sbatch.j2``, mode ``trial``) with two
steps around the training: ``python -m ftl.sweep.task start DIR FIRST`` asks the study for the task's
trial (or, in a requeued task, takes back the one it began: a task is named by its array job and
task id, which a requeue keeps) and prints its run directory; after training, ``finish DIR RUN
STATUS`` tells the study how it ended. Between them the task trains, checkpoints on Slurm's
warning and is requeued exactly as a training job is, so a preempted trial resumes from its
checkpoint. The study is SQLite in the sweep directory, which every node must see (as the run
directories already must).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from ftl.checkpoints.rundir import write_atomic
from ftl.distributed.slurm import _sbatch, _sbatch_command, render
from ftl.errors import UserError, exit_on_user_error
from ftl.sweep.study import TRIAL_FILE, Sweep, owner_of_this_task


def submit(sweep: Sweep, dry_run: bool = False) -> str:
    """Write ``<sweep>/slurm/trial.sbatch`` for the trials still to run and sbatch it; returns the
    array job's id (``dry_run``: the sbatch command)."""
    left = sweep.spec.trial_count - len(sweep.finished())
    if left <= 0:
        raise UserError(f"sweep {sweep.root}: all {sweep.spec.trial_count} trials have finished; raise trials in the sweep file to add more")
    directory = sweep.root / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "trial.sbatch"
    write_atomic(script, render(sweep.base, "trial", sweep=sweep, tasks=left, first=len(sweep.trials())))
    return shlex.join(_sbatch_command(script, None)) if dry_run else _sbatch(script, None)


def start(root: Path, first: int) -> str:
    """The run directory of this task's trial ('' when the sweep needs no more trials); ``first``:
    the trials the study held when the array was submitted (the task's sampler index follows on)."""
    sweep = Sweep.open(root)
    owner = owner_of_this_task()
    mine = sweep.running(owner)
    if mine:
        number = mine[0]
    elif len(sweep.finished()) >= sweep.spec.trial_count:  # (a task of an array submitted for more than was left)
        return ""
    else:
        number = sweep.ask(owner, index=first + int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    sweep.trial_recipe(number)
    return str(sweep.trial_dir(number))


def finish(root: Path, run_dir: Path, status: int) -> None:
    sweep = Sweep.open(root)
    number = int(json.loads((run_dir / TRIAL_FILE).read_text())["trial"])
    trial = sweep.finish(number, failure=None if status == 0 else f"training exited with status {status}")
    print(f"ftl: trial {number} {trial.state.name.lower()}" + (f", {sweep.spec.metric} {trial.value:.6g}" if trial.value is not None else ""))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "start":
        print(exit_on_user_error(lambda: start(Path(args[1]), int(args[2]))))
    elif len(args) == 4 and args[0] == "finish":
        exit_on_user_error(lambda: finish(Path(args[1]), Path(args[2]), int(args[3])))
    else:
        sys.exit("usage: python -m ftl.sweep.task start SWEEP_DIR FIRST | finish SWEEP_DIR RUN_DIR STATUS")


if __name__ == "__main__":
    main()
