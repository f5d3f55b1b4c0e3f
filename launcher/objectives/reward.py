"""Reward models: a sequence-classification head trained with the Bradley-Terry loss on
preference pairs, as TRL's ``RewardTrainer`` trains it.

The model is the base with a one-output score head (``AutoModelForSequenceClassification``,
``num_labels: 1``; under LoRA the head is trained whole beside the adapters, peft's ``SEQ_CLS``
task). A sequence's reward is the head's output at its last real token. With ``c``/``r`` the
rewards of a pair's chosen and rejected sequences (prompt and response, EOS appended to text
rows), ``m`` the row's optional ``margin`` field and ``k`` ``reward.center_rewards_coefficient``,
the loss of a pair is ``-logsig(c - r - m) + k (c + r)^2``; the step's loss is the mean over its
pairs (every micro-batch, every rank), TRL's mean over the batch when the step is one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ftl.objectives.base import Means, Objective, Problems, Reduce
from ftl.objectives.batch import Batch, Tokens, pad_rows
from ftl.objectives.preference import pair_sides


@dataclass
class ScoredPairs(Batch):
    """N pairs as 2N padded rows (chosen, then rejected) and each pair's margin (zeros without one)."""

    tokens: Tokens
    margin: torch.Tensor


def collate_scored(rows: list[dict[str, Any]], pad_token_id: int) -> ScoredPairs:
    return ScoredPairs(pad_rows(pair_sides(rows), pad_token_id), torch.tensor([float(r.get("margin") or 0.0) for r in rows]))


def scores(model: torch.nn.Module, tokens: Tokens) -> torch.Tensor:
    """Each sequence's reward (fp32): the score head at its last real token."""
    return model(**tokens.inputs(), use_cache=False).logits.squeeze(-1).float()


class Reward(Objective):
    name = "reward"
    formats = ("preference",)
    settings = ("reward.center_rewards_coefficient",)
    sequences_per_row = 2
    head = "score"

    @classmethod
    def check(cls, recipe: Any) -> Problems:
        if recipe.data.packing:
            return [(("data", "packing"), "a reward model scores each sequence at its last token, in rows of its own: "
                     "remove data.packing for method.objective reward")]
        return []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metrics = Means()

    def collate(self, rows: list[dict[str, Any]]) -> ScoredPairs:
        return collate_scored(rows, self.pad_token_id)

    def tokens(self, batch: ScoredPairs) -> Tokens:
        return batch.tokens

    def targets(self, batch: ScoredPairs) -> torch.Tensor:
        return torch.tensor(len(batch.margin), device=batch.margin.device)

    def loss_sum(self, model: torch.nn.Module, batch: ScoredPairs, training: bool = True) -> torch.Tensor:
        rewards = scores(model, batch.tokens)
        n = len(batch.margin)
        c, r = rewards[:n], rewards[n:]
        loss = -F.logsigmoid(c - r - batch.margin.to(rewards)) + self.recipe.reward.center_rewards_coefficient * (c + r) ** 2
        if training:
            for key, value in (("rewards_chosen", c), ("rewards_rejected", r), ("reward_accuracy", (c > r).float()),
                               ("reward_margin", c - r)):
                self.metrics.add(key, value)
        return loss.sum()

    def take_metrics(self, reduce: Reduce) -> dict[str, float]:
        return self.metrics.take(reduce)
