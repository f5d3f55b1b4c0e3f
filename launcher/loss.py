"""Causal-LM loss as a *sum* over trainable tokens, and the objective that uses it.

The training loop divides by the number of trainable tokens of the whole optimizer step (all
micro-batches, all ranks), so gradient accumulation and data parallelism give the same update as
one big batch. A per-micro-batch mean would weight short and long batches unequally.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_trainable_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that contribute to the loss: labels shifted left by one, minus ignored ones."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: Callable | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trainable tokens (fp32 logits), or through
    ``fused`` (``ftl.kernels.patch.FusedLoss``: the same sum without materialising the logits)."""
    # Packed batches carry position_ids and no attention mask (see ftl.packing).
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if fused is not None:
        return fused(model, inputs, batch["labels"])
    logits = model(**inputs, use_cache=False).logits.float()  # (a no-op for fp32 logits)
    # The labels shift left, not the logits: slicing the logits would copy them all (they are the
    # largest tensor of the step); the last position's target is ignored.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


class CausalLM:
    """The supervised fine-tuning objective, as the training step and evaluation call it.

    An objective gives, for a micro-batch, the loss summed over its targets and the number of
    targets; the step divides the sum by the targets of the whole optimizer step. A preference
    objective is another class with the same two methods.
    """

    def __init__(self, fused: Callable | None = None):
        self.fused = fused  # the fused cross-entropy (kernels), used in training steps only

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return count_trainable_tokens(batch["labels"])

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], training: bool = True) -> torch.Tensor:
        return causal_lm_loss_sum(model, batch, self.fused if training else None)
