"""Supervised fine-tuning: next-token cross-entropy on the trained tokens, as a *sum*.

The training loop divides by the trainable tokens of the whole optimizer step (all micro-batches,
all ranks), so gradient accumulation and data parallelism give the same update as one big batch;
a per-micro-batch mean would weight short and long batches unequally.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ftl.objectives.base import Objective
from ftl.objectives.batch import IGNORE_INDEX, Tokens, pad_rows


def causal_lm_loss_sum(model: torch.nn.Module, batch: Tokens, fused: Callable | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trainable tokens (fp32 logits), or through
    ``fused`` (``ftl.kernels.patch.FusedLoss``: the same sum without materialising the logits)."""
    inputs = batch.inputs()  # packed batches carry position_ids and no attention mask (see ftl.data.packing)
    if fused is not None:
        return fused(model, inputs, batch.labels)
    logits = model(**inputs, use_cache=False).logits.float()  # (a no-op for fp32 logits)
    # The labels shift left, not the logits: slicing the logits would copy them all (they are the
    # largest tensor of the step); the last position's target is ignored.
    labels = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


class SFT(Objective):
    """Rows of any supervised format; each trained token is a target. Packing happens at
    preprocessing (``ftl.data.packing``): a packed row is one more row here."""

    name = "sft"
    formats = ("alpaca", "chat", "sharegpt", "completion")
    fused_ce = True

    def collate(self, rows: list[dict[str, Any]]) -> Tokens:
        return pad_rows(rows, self.pad_token_id)

    def targets(self, batch: Tokens) -> torch.Tensor:
        return batch.trainable_tokens()

    def loss_sum(self, model: torch.nn.Module, batch: Tokens, training: bool = True) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch, self.fused if training else None)  # the fused kernel trains only
