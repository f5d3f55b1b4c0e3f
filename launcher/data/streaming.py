"""Streaming data (``data.streaming: true``): rows read lazily, for data larger than memory.

Each rank reads its own part of the stream: datasets' ``IterableDataset`` shuffled by shard order
and a buffer (seeded; ``set_epoch`` gives each epoch its own order), split by
``split_dataset_by_node``, and tokenized row by row as training asks for it. The position is
(epoch, raw rows this rank has read in the epoch); a checkpoint stores it per rank, and resuming
reopens the same stream and skips that many rows, so the continued run sees exactly the rows the
uninterrupted one would have (skipped rows are read again but not tokenized). When a rank's part
runs out, that rank starts its next epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

from datasets.distributed import split_dataset_by_node

from ftl.recipe.schema import Recipe
from ftl.data.sources import DataError, load_source, tokenize_row
from ftl.objectives.batch import IGNORE_INDEX

SHUFFLE_BUFFER = 1000


class RowStream:
    """Tokenized training rows of one rank, resumable at (epoch, consumed)."""

    def __init__(self, recipe: Recipe, tokenizer: Any, rank: int, world: int, epoch: int = 0, consumed: int = 0):
        self.recipe, self.tokenizer, self.rank, self.world = recipe, tokenizer, rank, world
        self.epoch, self.consumed = epoch, consumed
        self._usable_this_epoch = consumed > 0  # a resumed epoch already gave rows
        self._rows = self._open()

    def _open(self) -> Iterator[tuple[dict, Any]]:
        stream = load_source(self.recipe.data.train[0], streaming=True)
        stream = stream.shuffle(seed=self.recipe.train.seed, buffer_size=SHUFFLE_BUFFER)
        stream.set_epoch(self.epoch)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world)
        return iter(stream.skip(self.consumed))

    def next_rows(self, n: int) -> list[dict[str, list[int]]]:
        """The next ``n`` tokenized rows (rows without a trainable token are skipped)."""
        rows: list[dict[str, list[int]]] = []
        while len(rows) < n:
            try:
                raw = next(self._rows)
            except StopIteration:
                if self.consumed == 0:
                    raise DataError(f"data.train: rank {self.rank} of {self.world} got no rows from the stream") from None
                if not self._usable_this_epoch:  # another pass would find none either: never loop forever
                    raise DataError(f"{self.recipe.data.train[0].path}: none of the {self.consumed} rows this rank read has a "
                                    "trainable token within data.max_length")
                self.epoch, self.consumed, self._usable_this_epoch = self.epoch + 1, 0, False
                self._rows = self._open()
                continue
            self.consumed += 1
            source = self.recipe.data.train[0]
            row = tokenize_row(raw, source, self.tokenizer, self.recipe.data, where=f"{source.path}: streamed row")
            if any(label != IGNORE_INDEX for label in row["labels"]):
                self._usable_this_epoch = True
                rows.append({"input_ids": row["input_ids"], "labels": row["labels"]})
        return rows

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}
