"""Start a planned multi-process run with ``accelerate launch`` and stand in for it towards the user.

The ranks inherit stdout/stderr, so their output streams through unchanged. Stop signals (SIGTERM,
SIGUSR1 from Slurm, Ctrl-C) are forwarded to the ranks themselves, not to torchrun's agent,
which would otherwise kill them 30 s later or die of SIGUSR1: each rank finishes its step, they
save one checkpoint together and exit, and this process exits with 75 like a one-process run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ftl.recipe.schema import Recipe
from ftl.distributed.plan import Plan, write_launch_files
from ftl.checkpoints.rundir import RunDir
from ftl.console import console
from ftl.training.signals import EXIT_STOPPED, STOP_SIGNALS

if TYPE_CHECKING:
    from ftl.training.trainer import RunSummary

log = logging.getLogger(__name__)

LAUNCHED_ENV = "FTL_LAUNCHED"  # set for ranks started here: a stop then exits 0 (we report 75)


def train_or_launch(recipe: Recipe) -> tuple[int, RunSummary | None]:
    """What ``ftl train`` does with a resolved recipe (``ftl sweep`` too, for each trial): fit it to
    ``distributed.gpu_memory``, then train in this process, or start the planned processes and
    wait for them. Returns the exit status (75: stopped with a checkpoint) and, when it trained
    here, the run's summary."""
    from ftl.distributed.plan import make_plan
    from ftl.distributed.preflight import preflight, writer_lock

    if recipe.distributed.gpu_memory and "LOCAL_RANK" not in os.environ:
        recipe = _fit_memory(recipe)
    plan = make_plan(recipe)
    if plan.world_size > 1 and "LOCAL_RANK" not in os.environ:
        with writer_lock(recipe):
            preflight(recipe)
            console.print(f"launching {plan.world_size} processes ({plan.strategy}): {plan.shell_command()}", highlight=False)
            return launch(recipe, plan), None
    from ftl.train import train  # only here: the launcher process stays light

    summary = train(recipe)
    return (EXIT_STOPPED if summary.stopped else 0), summary


def _fit_memory(recipe: Recipe) -> Recipe:
    """Strategy auto with a known GPU size: choose what fits (as `ftl plan` shows); warn if nothing does."""
    from ftl.planning.memory import fit_recipe

    recipe, memory, gpu_gib = fit_recipe(recipe)
    console.print(f"memory plan: {recipe.distributed.strategy}, micro-batch {recipe.train.micro_batch_size}, "
                  f"estimate {memory.reserved:.1f} of {gpu_gib:g} GiB per GPU", highlight=False)
    if not memory.fits(gpu_gib):
        console.print(f"[yellow]warning[/]: the estimate ({memory.reserved:.1f} GiB reserved) exceeds distributed.gpu_memory "
                      f"({gpu_gib:g} GiB); see `ftl plan` for the parts", markup=True)
    return recipe


def launch(recipe: Recipe, plan: Plan) -> int:
    """Run ``plan.command`` to completion; returns its exit status (75: stopped with a checkpoint)."""
    write_launch_files(plan, recipe)
    stopped_marker = RunDir(Path(recipe.output.dir)).stopped
    stopped_marker.unlink(missing_ok=True)
    env = {**os.environ, **plan.env, LAUNCHED_ENV: "1"}
    # The ranks start with stop signals ignored (the disposition survives exec) until their training
    # loop installs its handlers; a stop is re-sent until they exit, so an early one is not lost.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        # A session of its own: a Ctrl-C in the terminal reaches only us, and we decide what to forward.
        proc = subprocess.Popen(plan.command, env=env, start_new_session=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if signum == signal.SIGINT and received.count(signal.SIGINT) > 1:
            os.killpg(proc.pid, signal.SIGINT)  # a second Ctrl-C aborts
            return
        _signal_ranks(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        while True:
            try:
                status = proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                if received and received[-1] != signal.SIGINT:
                    _signal_ranks(proc.pid, received[-1])  # ranks that were still starting
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_marker.exists():
        return EXIT_STOPPED
    return status if status >= 0 else 128 - status


def _signal_ranks(pid: int, signum: int) -> None:
    for rank in _children(pid):
        try:
            os.kill(rank, signum)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the ranks under torchrun's agent), from /proc."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids
