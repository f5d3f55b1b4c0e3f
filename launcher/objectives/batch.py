"""Typed micro-batches: what an objective's ``collate`` returns and its loss reads.

A batch is a dataclass of tensors (never a dict probed for optional keys); :meth:`Batch.to` moves
all of it to the device in one place. :class:`Tokens` is the unit every objective builds on: rows
of token ids with their labels, either padded on the right (``attention_mask``) or packed
(``position_ids`` restarting at each example, no attention mask: how transformers keeps packed
examples apart). An objective's batch holds one or more ``Tokens`` plus what its loss needs
besides (pair counts, labels, precomputed reference log-probabilities).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

IGNORE_INDEX = -100

B = TypeVar("B", bound="Batch")


@dataclass
class Batch:
    def to(self: B, device: torch.device | str) -> B:
        """The same batch with every tensor (nested batches included) on ``device``."""
        return dataclasses.replace(self, **{f.name: _moved(getattr(self, f.name), device) for f in dataclasses.fields(self)})


def _moved(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, (torch.Tensor, Batch)):
        return value.to(device)
    return value


@dataclass
class Tokens(Batch):
    """Rows of tokens. ``token_mask``: real tokens (not padding); ``sequence_lengths``: with several
    sequences packed padding-free into one row, where each one ends (see :func:`pack_sequences`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    token_mask: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    sequence_lengths: torch.Tensor | None = None

    def inputs(self) -> dict[str, torch.Tensor]:
        """What the model's forward takes."""
        return {k: v for k, v in (("input_ids", self.input_ids), ("attention_mask", self.attention_mask),
                                  ("position_ids", self.position_ids)) if v is not None}

    @property
    def sequences(self) -> int:
        """How many sequences the batch holds, packed or padded."""
        return len(self.sequence_lengths) if self.sequence_lengths is not None else self.input_ids.shape[0]

    def trainable_tokens(self) -> torch.Tensor:
        """Tokens that contribute to the loss: labels shifted left by one, minus ignored ones."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum()


def pad_rows(rows: list[dict[str, list[int]]], pad_token_id: int) -> Tokens:
    """Pad rows on the right to the longest. Rows packed at preprocessing (with ``position_ids``)
    get no attention mask; their padding is one more "example" whose labels are all ignored."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    if "position_ids" not in rows[0]:
        return Tokens(input_ids, labels, token_mask=mask, attention_mask=mask)
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row["position_ids"])
        positions[i, :n] = torch.tensor(row["position_ids"])
        positions[i, n:] = torch.arange(width - n)
    return Tokens(input_ids, labels, token_mask=mask, position_ids=positions)


def pack_sequences(sequences: list[dict[str, list[int]]]) -> Tokens:
    """Padding-free: the sequences one after another in a single row, ``position_ids`` restarting
    at each (transformers keeps them apart, see ``ftl.data.packing``) and ``sequence_lengths`` to tell
    them apart again after the forward. Each sequence's first token is no target, as alone."""
    input_ids, labels, positions = [], [], []
    for sequence in sequences:
        input_ids += sequence["input_ids"]
        labels += [IGNORE_INDEX] + list(sequence["labels"][1:])
        positions += range(len(sequence["input_ids"]))
    return Tokens(torch.tensor([input_ids]), torch.tensor([labels]), token_mask=torch.ones(1, len(input_ids), dtype=torch.long),
                  position_ids=torch.tensor([positions]),
                  sequence_lengths=torch.tensor([len(sequence["input_ids"]) for sequence in sequences]))


def sequences(sequences: list[dict[str, list[int]]], pad_token_id: int, packed: bool) -> Tokens:
    """Sequences as one ``Tokens``: padded rows, or (``packed``) all in one row without padding."""
    return pack_sequences(sequences) if packed else pad_rows(sequences, pad_token_id)
