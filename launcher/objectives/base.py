"""The contract between the training loop and an objective, and what objectives share.

The loop (``ftl.training.trainer``) knows only this interface: an objective turns rows into its typed
batch (``collate``), gives a micro-batch's loss as a *sum* and the number of targets it is summed
over (the step divides the sum by the targets of the whole optimizer step, every micro-batch and
every rank, so accumulation and data parallelism give the update of one big batch), may look at
the whole step first (``begin_step``), and reports its own metrics (``take_metrics``). The class
says the rest, read by the rules, the planner and the trainer before any model is built: the data
formats it trains on, the settings it reads, sequences per row, and which reference it needs.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from ftl.objectives.batch import IGNORE_INDEX, Batch, Tokens
from ftl.checkpoints.weights import weights_identity

if TYPE_CHECKING:
    from ftl.recipe.schema import Recipe

Problems = list[tuple[tuple, str]]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over every rank


class Objective:
    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # data formats whose rows it trains on
    settings: ClassVar[tuple[str, ...]] = ()  # the objectives' recipe keys it reads ("preference.beta")
    sequences_per_row: ClassVar[int] = 1  # sequences one row puts through the model (the planner's activations)
    packs_batches: ClassVar[bool] = False  # data.packing packs each micro-batch's sequences (not rows at preprocessing)
    fused_ce: ClassVar[bool] = False  # its loss is a summed cross-entropy, which the fused kernel computes
    head: ClassVar[str] = "causal_lm"  # the model's head: causal_lm (next-token logits) or score (one value per sequence)
    reference_columns: ClassVar[tuple[str, ...]] = ()  # per row, with preference.reference: precomputed
    reference_section: ClassVar[str | None] = None  # the recipe section whose `reference` says which reference it uses

    @classmethod
    def check(cls, recipe: Recipe) -> Problems:
        """Rules of this objective's own settings (the data formats and setting keys are checked for every objective)."""
        return []

    @classmethod
    def reference_copy(cls, recipe: Recipe) -> bool:
        """A frozen copy of the starting model runs beside the policy (full fine-tuning with a live
        reference; LoRA disables its adapter instead)."""
        return cls.reference_section is not None and recipe.method.type == "full" and not cls.precomputed(recipe)

    @classmethod
    def precomputed(cls, recipe: Recipe) -> bool:
        """The reference's log-probabilities are computed once before the first step (``reference_columns``)."""
        return cls.reference_section is not None and getattr(recipe, cls.reference_section).reference == "precomputed"

    def __init__(self, recipe: Recipe, pad_token_id: int, fused: Callable | None = None,
                 reference: torch.nn.Module | None = None):
        self.recipe, self.pad_token_id, self.fused, self.reference = recipe, pad_token_id, fused, reference
        self.packed = recipe.data.packing and self.packs_batches
        if self.reference_copy(recipe) != (reference is not None):  # else the policy would be its own reference
            raise ValueError(f"{recipe.method.type} fine-tuning with {self.name}: unexpected reference {type(reference).__name__}")

    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        raise NotImplementedError

    def targets(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum(self, model: torch.nn.Module, batch: Any, training: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, batch: Any) -> Tokens:
        """The tokens a batch trains on (counted for tokens/s)."""
        return batch

    def begin_step(self, model: torch.nn.Module, micro: list[Any], reduce: Reduce) -> None:
        """Before the step's first forward, with all its micro-batches: terms taken over the whole step."""

    def take_metrics(self, reduce: Reduce) -> dict[str, float]:
        """Means of its own metrics since the last call, over every rank."""
        return {}

    def reference_logps(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """``model``'s log-probabilities of each row, (rows, len(reference_columns)): before the first
        step the model is the reference, and this is what ``preference.reference: precomputed`` stores."""
        raise NotImplementedError

    def live_reference_logps(self, model: torch.nn.Module, tokens: Tokens) -> torch.Tensor:
        """The reference's log-probability of each sequence: the frozen copy, or the model with its
        adapter disabled (LoRA; full fine-tuning without a copy is the starting model itself)."""
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, tokens)[0]
            inner = getattr(model, "module", model)
            with (inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext()):
                return sequence_logps(model, tokens)[0]


def target_sequences(tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """For each next-token target (``labels[:, 1:]``): whether it counts, and the sequence it is in."""
    labels = tokens.labels[:, 1:]
    if tokens.sequence_lengths is not None:  # padding-free: every sequence in one row
        lengths = tokens.sequence_lengths
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                        output_size=tokens.input_ids.shape[1])
        return labels != IGNORE_INDEX, owner[None, 1:]
    return labels != IGNORE_INDEX, torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)


def sequence_logps(model: torch.nn.Module, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of its targets' log-probabilities (fp32) and how many targets it has."""
    logits = model(**tokens.inputs(), use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = tokens.labels[:, 1:]
    mask, owner = target_sequences(tokens)
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
    if tokens.sequence_lengths is None:
        return token_logps.sum(-1), mask.sum(-1)
    n = tokens.sequences
    return (token_logps.new_zeros(n).index_add(0, owner[0], token_logps[0]),
            mask.new_zeros(n, dtype=torch.long).index_add(0, owner[0], mask[0].long()))


class Means:
    """Running sums of per-row metrics, and how many rows each one covers, until taken."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, key: str, values: torch.Tensor) -> None:
        values = values.detach().float()
        pair = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
        self.sums[key] = self.sums[key] + pair if key in self.sums else pair

    def take(self, reduce: Reduce) -> dict[str, float]:
        """Means over every rank since the last call (a key no row had is left out), then reset."""
        sums, self.sums = {k: reduce(v) for k, v in self.sums.items()}, {}
        return {k: (v[0] / v[1]).item() for k, v in sums.items() if v[1] > 0}


@torch.no_grad()
def precompute_reference(model: torch.nn.Module, collate: Callable[[list], Batch], logps: Callable[[torch.nn.Module, Any], torch.Tensor],
                         rows: Any, batch_size: int, device: torch.device, autocast: Callable) -> torch.Tensor:
    """``logps`` (an objective's ``reference_logps``) of every row, in order: one forward per batch.
    Every rank runs every batch (a sharded model needs all ranks in each forward)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))]).to(device)
        with autocast(device):
            out.append(logps(model, batch).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def reference_file(recipe: Recipe, objective: type[Objective], data_cache: Path) -> Path:
    """Where a run's precomputed reference log-probabilities live: beside its preprocessed data, named
    for what they depend on besides the data: the objective (which sequences a row holds), the starting
    model (its settings and its weights' identity: a model replaced at the same path gets new ones) and
    how it computes."""
    key = {"model": recipe.model.model_dump(mode="json"), "quantization": recipe.quantization.model_dump(mode="json"),
           "mixed_precision": recipe.train.mixed_precision, "weights": weights_identity(recipe.model.path)}
    if "preference" not in objective.formats:  # (pairs' files keep the names they had before other objectives had any)
        key["columns"] = list(objective.reference_columns)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_cache) / f"reference-logps-{digest}.pt"
