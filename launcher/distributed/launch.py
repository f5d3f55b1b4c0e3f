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

from ftl.recipe.schema import Recipe
from ftl.distributed.plan import Plan, write_launch_files
from ftl.checkpoints.rundir import RunDir
from ftl.training.signals import EXIT_STOPPED, STOP_SIGNALS

log = logging.getLogger(__name__)

LAUNCHED_ENV = "FTL_LAUNCHED"  # set for ranks started here: a stop then exits 0 (we report 75)


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
