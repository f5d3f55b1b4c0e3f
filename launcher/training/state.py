"""TrainState: everything besides weights, optimizer and schedule that continues a run exactly.

The checkpointer saves it as one object (``trainer_state.json`` for what all ranks share, and per
rank its RNG streams and, when streaming, its place in the stream) and gives it back on resume.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    position: int = 0  # index of the next micro-batch into this epoch's micro-batches
    total_steps: int = 0
    method: str = "lora"  # what the run trains; a checkpoint continues only the same training
    bits: int | None = None
    base_identity: str | None = None  # ftl.checkpoints.weights.weights_identity of model.path: the base trained on
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    initial_eval_losses: dict[str, float] | None = None  # every eval set's, before the first step (the base model's)
    # train.early_stopping's judge (ftl.training.early_stopping): the best evaluation so far and since when
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    early_stopped: bool = False
    pruned: bool = False  # a sweep's pruner stopped this trial (ftl.sweep.report)
    # Per rank, not in trainer_state.json:
    data: dict[str, Any] | None = None  # streaming: this rank's position in its part of the stream
    rng: dict[str, Any] | None = field(default=None, repr=False)  # this rank's RNG streams, as loaded

    SHARED = ("step", "epoch", "position", "total_steps", "method", "bits", "base_identity", "initial_eval_loss",
              "final_eval_loss", "initial_eval_losses", "best_metric", "best_step", "evals_since_best", "early_stopped",
              "pruned")

    @property
    def finished_early(self) -> bool:
        """Early stopping's patience or a sweep's pruner ended the run before its last step."""
        return self.early_stopped or self.pruned

    def shared(self) -> dict[str, Any]:
        """What ``trainer_state.json`` holds: the same on every rank."""
        return {k: v for k, v in asdict(self).items() if k in self.SHARED}

    @classmethod
    def from_shared(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**{k: saved[k] for k in cls.SHARED if k in saved})

    def restore_rng(self) -> None:
        """Continue this rank's RNG streams where the checkpoint left them (call right before
        training continues, so nothing else draws from them first)."""
        if self.rng is None:
            return
        version, internal, gauss = self.rng["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = self.rng["numpy"]
        np.random.set_state((np_state["kind"], np.array(np_state["keys"], dtype=np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        torch.set_rng_state(self.rng["torch"])
        if torch.cuda.is_available() and self.rng.get("cuda"):
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def rng_state() -> dict[str, Any]:
    """This process's RNG streams, in a form that loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy arrays would need pickle; plain lists load with weights_only=True
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
