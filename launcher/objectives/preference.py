"""Pairwise preference objectives (DPO, IPO, SimPO, ORPO) on the one training loop.

A micro-batch holds N pairs as 2N sequences, the chosen sides then the rejected, through the model
in one forward: 2N padded rows, or with ``data.packing`` one row without padding (the block-diagonal
attention keeps the sequences apart). Each sequence's log-probability is the sum of its targets'
log-probabilities (the response and its EOS/end-of-turn token, never the prompt); ``avg`` below is
that sum over the number of targets. With ``c``/``r`` the policy's chosen/rejected log-probabilities,
``rc``/``rr`` the reference model's, ``b`` beta and ``e`` label smoothing, the loss of a pair is

- dpo sigmoid: ``-(1-e) logsig(b d) - e logsig(-b d)``, ``d = (c - rc) - (r - rr)`` (e > 0: conservative DPO);
  hinge: ``relu(1 - b d)``; robust: ``(-(1-e) logsig(b d) + e logsig(-b d)) / (1 - 2e)``
- ipo: ``((c - rc)/n_c - (r - rr)/n_r - 1/(2b))^2`` (per-token log-ratios, as the IPO authors and TRL)
- simpo: ``-(1-e) logsig(b (avg_c - avg_r) - g) - e logsig(-(b (avg_c - avg_r) - g))``, no reference
- orpo: ``alpha * -logsig(log odds(avg_c) - log odds(avg_r))``, ``log odds(p) = p - log(1 - exp(p))``, plus
  the chosen responses' next-token loss averaged over all chosen tokens of the optimizer step.

The targets are pairs: the step's loss is the mean over the step's pairs (every micro-batch, every
rank); ORPO's NLL term is scaled so it is the mean over the step's chosen tokens (TRL's per-batch mean).

The reference (dpo, ipo): for LoRA/QLoRA the same model with its adapter disabled (no second copy of
the weights); for full fine-tuning a frozen copy of the starting model, made before training; or,
with ``preference.reference: precomputed``, the starting model's log-probabilities of every row,
computed in one pass before the first step and kept beside the preprocessed data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ftl.objectives.base import Means, Objective, Problems, Reduce, sequence_logps, target_sequences
from ftl.objectives.batch import Batch, Tokens, sequences


@dataclass
class Pairs(Batch):
    """N pairs: 2N sequences, the chosen sides then the rejected; ``reference`` (N, 2) when precomputed."""

    tokens: Tokens
    pairs: int
    reference: torch.Tensor | None = None


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_sides(rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """The rows' chosen sequences, then their rejected ones."""
    return ([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
            + [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows])


def collate_pairs(rows: list[dict[str, Any]], pad_token_id: int, packed: bool = False) -> Pairs:
    reference = None
    if REFERENCE_COLUMNS[0] in rows[0]:  # preference.reference: precomputed
        reference = torch.tensor([[r[c] for c in REFERENCE_COLUMNS] for r in rows])
    return Pairs(sequences(pair_sides(rows), pad_token_id, packed), len(rows), reference)


def pair_logps(model: torch.nn.Module, batch: Pairs) -> torch.Tensor:
    """(pairs, 2): the model's log-probabilities of each pair's chosen and rejected response."""
    logps, _ = sequence_logps(model, batch.tokens)
    return torch.stack([logps[: batch.pairs], logps[batch.pairs :]], dim=1)


class Pairwise(Objective):
    formats = ("preference",)
    sequences_per_row = 2
    packs_batches = True
    reference_columns = REFERENCE_COLUMNS

    def __init__(self, recipe: Any, pad_token_id: int, fused: Any = None, reference: torch.nn.Module | None = None):
        super().__init__(recipe, pad_token_id, fused, reference)
        self.preference = recipe.preference
        self.metrics = Means()

    def collate(self, rows: list[dict[str, Any]]) -> Pairs:
        return collate_pairs(rows, self.pad_token_id, self.packed)

    def tokens(self, batch: Pairs) -> Tokens:
        return batch.tokens

    def targets(self, batch: Pairs) -> torch.Tensor:
        return torch.tensor(batch.pairs, device=batch.tokens.input_ids.device)

    def reference_logps(self, model: torch.nn.Module, batch: Pairs) -> torch.Tensor:
        return pair_logps(model, batch)

    def pair_losses(self, c: torch.Tensor, r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor,
                    rc: torch.Tensor | None, rr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss of each pair, reward of chosen, reward of rejected)."""
        raise NotImplementedError

    def loss_sum(self, model: torch.nn.Module, batch: Pairs, training: bool = True) -> torch.Tensor:
        n = batch.pairs
        logps, counts = sequence_logps(model, batch.tokens)
        c, r, n_c, n_r = logps[:n], logps[n:], counts[:n].clamp(min=1), counts[n:].clamp(min=1)
        rc = rr = None
        if batch.reference is not None:
            rc, rr = batch.reference[:, 0].to(logps.dtype), batch.reference[:, 1].to(logps.dtype)
        elif self.reference_section is not None:
            ref = self.live_reference_logps(model, batch.tokens)
            rc, rr = ref[:n], ref[n:]
        losses, chosen_rewards, rejected_rewards = self.pair_losses(c, r, n_c, n_r, rc, rr)
        if training:
            for key, value in (("rewards_chosen", chosen_rewards), ("rewards_rejected", rejected_rewards),
                               ("reward_accuracy", (chosen_rewards > rejected_rewards).float()),
                               ("reward_margin", chosen_rewards - rejected_rewards), ("logps_chosen", c), ("logps_rejected", r)):
                self.metrics.add(key, value)
        return losses.sum() + self.extra_loss(c, n_c, n, training)

    def extra_loss(self, c: torch.Tensor, n_c: torch.Tensor, pairs: int, training: bool) -> torch.Tensor | float:
        return 0.0

    def take_metrics(self, reduce: Reduce) -> dict[str, float]:
        return self.metrics.take(reduce)


def _sigmoid_loss(z: torch.Tensor, e: float) -> torch.Tensor:
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


class DPO(Pairwise):
    name = "dpo"
    settings = ("preference.beta", "preference.label_smoothing", "preference.loss_type", "preference.reference")
    reference_section = "preference"

    @classmethod
    def check(cls, recipe: Any) -> Problems:
        p = recipe.preference
        if p.label_smoothing and p.loss_type == "hinge":
            return [(("preference", "label_smoothing"), "applies to loss_type sigmoid or robust, not hinge")]
        return []

    def pair_losses(self, c, r, n_c, n_r, rc, rr):
        p = self.preference
        b, e = p.beta, p.label_smoothing
        chosen, rejected = c - rc, r - rr
        d = b * (chosen - rejected)
        if p.loss_type == "hinge":
            loss = torch.relu(1 - d)
        elif p.loss_type == "robust":
            loss = (-(1 - e) * F.logsigmoid(d) + e * F.logsigmoid(-d)) / (1 - 2 * e)
        else:
            loss = _sigmoid_loss(d, e)
        return loss, b * chosen.detach(), b * rejected.detach()


class IPO(Pairwise):
    name = "ipo"
    settings = ("preference.beta", "preference.reference")
    reference_section = "preference"

    def pair_losses(self, c, r, n_c, n_r, rc, rr):
        b = self.preference.beta
        chosen, rejected = c - rc, r - rr
        return (chosen / n_c - rejected / n_r - 1 / (2 * b)) ** 2, b * chosen.detach(), b * rejected.detach()


class SimPO(Pairwise):
    name = "simpo"
    settings = ("preference.beta", "preference.label_smoothing", "preference.simpo_gamma")

    def pair_losses(self, c, r, n_c, n_r, rc, rr):
        p = self.preference
        avg_c, avg_r = c / n_c, r / n_r
        z = p.beta * (avg_c - avg_r) - p.simpo_gamma
        return _sigmoid_loss(z, p.label_smoothing), p.beta * avg_c.detach(), p.beta * avg_r.detach()


class ORPO(Pairwise):
    name = "orpo"
    settings = ("preference.orpo_alpha",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.step_chosen_tokens: torch.Tensor | None = None
        self.step_pairs: torch.Tensor | None = None

    def begin_step(self, model: torch.nn.Module, micro: list[Pairs], reduce: Reduce) -> None:
        """The NLL term is a mean over the step's chosen tokens: count them (every rank) first."""
        chosen = []
        for mb in micro:
            mask, owner = target_sequences(mb.tokens)
            chosen.append((mask & (owner < mb.pairs)).sum())
        self.step_chosen_tokens = reduce(sum(chosen)).clamp(min=1)
        self.step_pairs = reduce(sum(self.targets(mb) for mb in micro)).clamp(min=1)

    def pair_losses(self, c, r, n_c, n_r, rc, rr):
        alpha = self.preference.orpo_alpha
        avg_c, avg_r = c / n_c, r / n_r  # log odds of the per-token average probability
        log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
        return -alpha * F.logsigmoid(log_odds), alpha * avg_c.detach(), alpha * avg_r.detach()

    def extra_loss(self, c, n_c, pairs, training):
        nll = -c.sum()  # summed over this micro-batch's chosen tokens
        if training and self.step_chosen_tokens is not None:
            return nll * self.step_pairs / self.step_chosen_tokens
        return nll * pairs / n_c.sum()  # evaluation: this batch's own token mean
