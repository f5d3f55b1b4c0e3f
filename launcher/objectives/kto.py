"""KTO (Kahneman-Tversky optimisation) on unpaired feedback: each row is one completion labelled
desirable or undesirable, as TRL's ``KTOTrainer`` trains it.

With ``r = b (log pi(y|x) - log ref(y|x))`` a row's implied reward and ``z`` the reference point, a
desirable row's loss is ``w_d (1 - sigmoid(r - b z))`` and an undesirable one's ``w_u (1 - sigmoid(b z - r))``.
``z`` estimates KL(pi || ref) from mismatched pairs: each row's prompt with another row's
completion (``ftl.data.unpaired``: the completions rotated by one over the data, as TRL rotates
them within a batch), ``z = max(0, mean(log pi(y'|x) - log ref(y'|x)))``, without gradient.

TRL takes that mean over one micro-batch on each rank; ftl over the whole optimizer step (every
micro-batch, every rank, in ``begin_step``), so accumulation and data parallelism give exactly the
update of one big batch, which is TRL's own when the step is one micro-batch on one process. The
targets are rows: the step's loss is the mean over its rows (TRL's mean over the batch).

The reference: LoRA/QLoRA the model with its adapter disabled; full fine-tuning a frozen copy, or
``kto.reference: precomputed`` (both log-probabilities of each row stored before the first step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ftl.objectives.base import Means, Objective, Reduce, sequence_logps
from ftl.objectives.batch import Batch, Tokens, sequences


@dataclass
class Unpaired(Batch):
    """N rows: their completions, the mismatched sequences (row i's prompt, another row's
    completion), which rows are desirable, and ``reference`` (N, 2) when precomputed."""

    completions: Tokens
    mismatched: Tokens
    desirable: torch.Tensor
    reference: torch.Tensor | None = None


class KTO(Objective):
    name = "kto"
    formats = ("unpaired",)
    settings = ("kto.beta", "kto.desirable_weight", "kto.undesirable_weight", "kto.reference")
    packs_batches = True
    reference_columns = ("ref_logps", "ref_kl_logps")
    reference_section = "kto"

    def __init__(self, recipe: Any, pad_token_id: int, fused: Any = None, reference: torch.nn.Module | None = None):
        super().__init__(recipe, pad_token_id, fused, reference)
        self.step_kl: torch.Tensor | None = None
        self.metrics = Means()

    def collate(self, rows: list[dict[str, Any]]) -> Unpaired:
        completions = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        mismatched = [{"input_ids": r["kl_input_ids"], "labels": r["kl_labels"]} for r in rows]
        reference = None
        if self.reference_columns[0] in rows[0]:  # preference.reference: precomputed
            reference = torch.tensor([[r[c] for c in self.reference_columns] for r in rows])
        return Unpaired(sequences(completions, self.pad_token_id, self.packed), sequences(mismatched, self.pad_token_id, self.packed),
                        torch.tensor([bool(r["desirable"]) for r in rows]), reference)

    def tokens(self, batch: Unpaired) -> Tokens:
        return batch.completions

    def targets(self, batch: Unpaired) -> torch.Tensor:
        return torch.tensor(len(batch.desirable), device=batch.desirable.device)

    def reference_logps(self, model: torch.nn.Module, batch: Unpaired) -> torch.Tensor:
        return torch.stack([sequence_logps(model, batch.completions)[0], sequence_logps(model, batch.mismatched)[0]], dim=1)

    @torch.no_grad()
    def _kl_sum(self, model: torch.nn.Module, batch: Unpaired) -> torch.Tensor:
        """The sum over the batch's mismatched sequences of log pi - log ref."""
        policy = sequence_logps(model, batch.mismatched)[0]
        ref = batch.reference[:, 1].to(policy) if batch.reference is not None else self.live_reference_logps(model, batch.mismatched)
        return (policy - ref).sum()

    def begin_step(self, model: torch.nn.Module, micro: list[Unpaired], reduce: Reduce) -> None:
        """The reference point of the whole step: the KL estimate over its mismatched pairs on every rank."""
        total = reduce(torch.stack([sum(self._kl_sum(model, mb) for mb in micro).float(),
                                    torch.tensor(float(sum(len(mb.desirable) for mb in micro)), device=micro[0].desirable.device)]))
        self.step_kl = (total[0] / total[1]).clamp(min=0)
        self.metrics.add("kl", self.step_kl[None])

    def loss_sum(self, model: torch.nn.Module, batch: Unpaired, training: bool = True) -> torch.Tensor:
        p = self.recipe.kto
        logps = sequence_logps(model, batch.completions)[0]
        if batch.reference is not None:
            ref = batch.reference[:, 0].to(logps.dtype)
        else:
            ref = self.live_reference_logps(model, batch.completions)
        if training and self.step_kl is not None:
            kl = self.step_kl
        else:  # evaluation: this batch's own estimate
            kl = (self._kl_sum(model, batch) / len(batch.desirable)).clamp(min=0)
        ratio = logps - ref
        good = batch.desirable
        losses = torch.where(good, p.desirable_weight * (1 - torch.sigmoid(p.beta * (ratio - kl))),
                             p.undesirable_weight * (1 - torch.sigmoid(p.beta * (kl - ratio))))
        if training:
            rewards = p.beta * ratio.detach()
            for key, values in (("rewards_chosen", rewards[good]), ("rewards_rejected", rewards[~good]),
                                ("logps_chosen", logps[good]), ("logps_rejected", logps[~good])):
                self.metrics.add(key, values)
        return losses.sum()

    def take_metrics(self, reduce: Reduce) -> dict[str, float]:
        values = self.metrics.take(reduce)
        if "rewards_chosen" in values and "rewards_rejected" in values:
            values["reward_margin"] = values["rewards_chosen"] - values["rewards_rejected"]
        return values
