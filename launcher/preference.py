"""Preference objectives (DPO, IPO, SimPO, ORPO) on the one training loop.

A micro-batch holds N pairs as 2N sequences, the chosen sides then the rejected (``ftl.data.collate``),
through the model in one forward: 2N padded rows, or with ``data.packing`` one row without padding
(``ftl.data.pack_sequences``; the block-diagonal attention keeps the sequences apart). Each
sequence's log-probability is the sum of its targets' log-probabilities (the response and its
EOS/end-of-turn token, never the prompt); ``avg`` below is that sum over the number of targets. With ``c``/``r`` the policy's chosen/rejected log-probabilities,
``rc``/``rr`` the reference model's, ``b`` beta and ``e`` label smoothing, the loss of a pair is

- dpo sigmoid: ``-(1-e) logsig(b d) - e logsig(-b d)``, ``d = (c - rc) - (r - rr)`` (e > 0: conservative DPO);
  hinge: ``relu(1 - b d)``; robust: ``(-(1-e) logsig(b d) + e logsig(-b d)) / (1 - 2e)``
- ipo: ``((c - rc)/n_c - (r - rr)/n_r - 1/(2b))^2`` (per-token log-ratios, as the IPO authors and TRL)
- simpo: ``-(1-e) logsig(b (avg_c - avg_r) - g) - e logsig(-(b (avg_c - avg_r) - g))``, no reference
- orpo: ``alpha * -logsig(log odds(avg_c) - log odds(avg_r))``, ``log odds(p) = p - log(1 - exp(p))``, plus
  the chosen responses' next-token loss averaged over all chosen tokens of the optimizer step.

The trainer divides the sum over pairs by the pairs of the whole optimizer step (every
micro-batch, every rank), so accumulation and data parallelism give the mean over the step's pairs;
ORPO's NLL term is scaled so it is the mean over the step's chosen tokens (TRL's per-batch mean).

The reference (dpo, ipo): for LoRA/QLoRA the same model with its adapter disabled (no second copy of
the weights); for full fine-tuning a frozen copy of the starting model, made before training; or,
with ``preference.reference: precomputed``, the starting model's log-probabilities of every row,
computed in one pass before the first step and kept beside the preprocessed data (no reference
forward and no reference weights during training; a resumed run reads them back).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ftl.config import Recipe
from ftl.loss import IGNORE_INDEX
from ftl.weights import weights_identity


def sequence_count(batch: dict[str, torch.Tensor]) -> int:
    """How many sequences (chosen then rejected sides) a micro-batch holds, packed or padded."""
    return len(batch["sequence_lengths"]) if "sequence_lengths" in batch else batch["input_ids"].shape[0]


def target_sequences(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each next-token target (``labels[:, 1:]``): whether it counts, and the sequence it is in."""
    labels = batch["labels"][:, 1:]
    if "sequence_lengths" in batch:  # padding-free: every sequence in one row
        lengths = batch["sequence_lengths"]
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                        output_size=batch["input_ids"].shape[1])
        return labels != IGNORE_INDEX, owner[None, 1:]
    return labels != IGNORE_INDEX, torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of its targets' log-probabilities (fp32) and how many targets it has."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask, owner = target_sequences(batch)
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
    if "sequence_lengths" not in batch:
        return token_logps.sum(-1), mask.sum(-1)
    n = sequence_count(batch)
    return (token_logps.new_zeros(n).index_add(0, owner[0], token_logps[0]),
            mask.new_zeros(n, dtype=torch.long).index_add(0, owner[0], mask[0].long()))


def pair_losses(objective: str, recipe: Recipe, c: torch.Tensor, r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor,
                rc: torch.Tensor | None, rr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of each pair without ORPO's NLL term, reward of chosen, reward of rejected)."""
    p = recipe.preference
    b, e = p.beta, p.label_smoothing
    if objective in ("dpo", "ipo"):
        chosen, rejected = c - rc, r - rr
        if objective == "ipo":
            loss = (chosen / n_c - rejected / n_r - 1 / (2 * b)) ** 2
        elif p.loss_type == "hinge":
            loss = torch.relu(1 - b * (chosen - rejected))
        elif p.loss_type == "robust":
            d = b * (chosen - rejected)
            loss = (-(1 - e) * F.logsigmoid(d) + e * F.logsigmoid(-d)) / (1 - 2 * e)
        else:
            d = b * (chosen - rejected)
            loss = -(1 - e) * F.logsigmoid(d) - e * F.logsigmoid(-d)
        return loss, b * chosen.detach(), b * rejected.detach()
    avg_c, avg_r = c / n_c, r / n_r
    if objective == "simpo":
        z = b * (avg_c - avg_r) - p.simpo_gamma
        loss = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        return loss, b * avg_c.detach(), b * avg_r.detach()
    # orpo: log odds of the per-token average probability
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    return -p.orpo_alpha * F.logsigmoid(log_odds), p.orpo_alpha * avg_c.detach(), p.orpo_alpha * avg_r.detach()


def needs_reference_copy(recipe: Recipe) -> bool:
    """Full-fine-tuning DPO/IPO with a live reference: a frozen copy of the starting model runs beside
    the policy (LoRA disables its adapter instead; precomputed stores the log-probabilities)."""
    return recipe.method.objective in ("dpo", "ipo") and recipe.method.type == "full" and recipe.preference.reference != "precomputed"


class Preference:
    """The objective the trainer calls (``targets``, ``loss_sum``; see ``ftl.loss.CausalLM``), and the
    metrics of the pairs it saw since the last ``take_metrics``. ``reference``: the frozen copy of
    full fine-tuning (see ``needs_reference_copy``), placed by the strategy; None otherwise."""

    def __init__(self, recipe: Recipe, reference: torch.nn.Module | None = None):
        self.recipe, self.objective = recipe, recipe.method.objective
        self.uses_reference = self.objective in ("dpo", "ipo")
        self.reference = reference
        self.precomputed = self.uses_reference and recipe.preference.reference == "precomputed"
        if needs_reference_copy(recipe) != (reference is not None):  # else the policy would be its own reference
            raise ValueError(f"{recipe.method.type} fine-tuning with {self.objective} and preference.reference "
                             f"{recipe.preference.reference}: unexpected reference {type(reference).__name__}")
        self.step_chosen_tokens: torch.Tensor | None = None
        self.step_pairs: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor] = {}

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(sequence_count(batch) // 2, device=batch["input_ids"].device)

    def begin_step(self, micro: list[dict[str, torch.Tensor]], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """ORPO's NLL term is a mean over the step's chosen tokens: count them (every rank) first."""
        if self.objective == "orpo":
            chosen = []
            for mb in micro:
                mask, owner = target_sequences(mb)
                chosen.append((mask & (owner < sequence_count(mb) // 2)).sum())
            self.step_chosen_tokens = reduce(sum(chosen)).clamp(min=1)
            self.step_pairs = reduce(sum(self.targets(mb) for mb in micro)).clamp(min=1)

    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, batch)
            inner = getattr(model, "module", model)
            with (inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()):
                return sequence_logps(model, batch)

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], training: bool = True) -> torch.Tensor:
        n = sequence_count(batch) // 2
        logps, counts = sequence_logps(model, batch)
        c, r, n_c, n_r = logps[:n], logps[n:], counts[:n].clamp(min=1), counts[n:].clamp(min=1)
        rc = rr = None
        if self.precomputed:
            ref = batch["ref_logps"].to(logps.dtype)
            rc, rr = ref[:n], ref[n:]
        elif self.uses_reference:
            ref, _ = self.reference_logps(model, batch)
            rc, rr = ref[:n], ref[n:]
        losses, chosen_rewards, rejected_rewards = pair_losses(self.objective, self.recipe, c, r, n_c, n_r, rc, rr)
        loss = losses.sum()
        if self.objective == "orpo":
            nll = -c.sum()  # summed over this micro-batch's chosen tokens
            if training and self.step_chosen_tokens is not None:
                loss = loss + nll * self.step_pairs / self.step_chosen_tokens
            else:  # evaluation: this batch's own token mean
                loss = loss + nll * n / n_c.sum()
        if training:
            self._add(chosen_rewards, rejected_rewards, c.detach(), r.detach())
        return loss

    def _add(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> None:
        values = {"rewards_chosen": chosen_rewards, "rewards_rejected": rejected_rewards,
                  "reward_accuracy": (chosen_rewards > rejected_rewards).float(), "reward_margin": chosen_rewards - rejected_rewards,
                  "logps_chosen": c, "logps_rejected": r}
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0) + value.float().sum()
        self._sums["pairs"] = self._sums.get("pairs", 0) + torch.tensor(float(len(c)), device=c.device)

    def take_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Means over the pairs since the last call (every rank), then reset."""
        if not self._sums:
            return {}
        sums = {k: reduce(v) for k, v in self._sums.items()}
        self._sums = {}
        pairs = sums.pop("pairs").clamp(min=1)
        return {k: (v / pairs).item() for k, v in sums.items()}


def reference_file(recipe: Recipe, data_cache: Path) -> Path:
    """Where a run's precomputed reference log-probabilities live: beside its preprocessed data, named
    for what they depend on besides the data: the starting model (its settings and its weights' identity:
    a model replaced at the same path gets new ones) and how it computes."""
    key = {"model": recipe.model.model_dump(mode="json"), "quantization": recipe.quantization.model_dump(mode="json"),
           "mixed_precision": recipe.train.mixed_precision, "weights": weights_identity(recipe.model.path)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_cache) / f"reference-logps-{digest}.pt"


@torch.no_grad()
def precompute_reference(model: torch.nn.Module, rows: Any, collate: Callable[[list], dict], batch_size: int,
                         device: torch.device, autocast: Callable) -> torch.Tensor:
    """The model's (chosen, rejected) log-probabilities of every row, in order: one forward per batch.
    Every rank runs every batch (a sharded model needs all ranks in each forward)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logps, _ = sequence_logps(model, batch)
        n = sequence_count(batch) // 2
        out.append(torch.stack([logps[:n], logps[n:]], dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out)
