"""Graceful stops: SIGTERM, SIGUSR1 (Slurm's warning before the time limit) and a first Ctrl-C.

A signal only sets a flag. The training loop finishes its current optimizer step, every rank
agrees to stop, a checkpoint is saved, a ``STOPPED`` marker says why, and the process exits with
:data:`EXIT_STOPPED` so a wrapper (the Slurm script) knows to requeue. A second Ctrl-C aborts.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing this module must stay cheap: `ftl train` installs handlers first thing
    from accelerate import Accelerator

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run the same command to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Installs the handlers for the duration of a ``with`` block; ``reason`` is set on a signal."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles signals itself
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again aborts)", self.reason)

    def agreed(self, accelerator: Accelerator, save_due: bool = False) -> tuple[str | None, bool]:
        """The reason to stop if any rank was signalled, and whether the first rank's clock says a
        timed checkpoint is due (ranks stop and save at the same step; one collective for both)."""
        if accelerator.num_processes == 1:
            return self.reason, save_due
        import torch

        flags = torch.tensor([1 if self.reason else 0, 1 if save_due and accelerator.is_main_process else 0],
                             device=accelerator.device)
        stop, due = accelerator.reduce(flags, reduction="sum").tolist()
        return (self.reason or "signal on another rank") if stop else None, bool(due)
