"""Packing: several tokenized examples per row of ``max_length``, never attending across them.

Examples are placed by best-fit decreasing (longest first, each into the fullest row it still
fits), which fills rows to within a few percent on real length distributions. A packed row
carries ``position_ids`` that restart at 0 for each example and no attention mask: transformers
then builds a block-diagonal causal mask from the restarts (SDPA and eager on CPU, the varlen path
of FlashAttention-2 on GPU), so each example sees only itself, exactly as if it ran alone. The
first token of each example gets label -100, since alone it has nothing to be predicted from; in
a packed row it would otherwise be "predicted" from the end of the previous example.
"""

from __future__ import annotations

import bisect
from typing import Any

import datasets

from ftl.objectives.batch import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity``; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin id), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the row length {capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, b = free.pop(slot)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return bins


def pack_dataset(dataset: datasets.Dataset, max_length: int) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Packed rows (input_ids, labels, position_ids) and the packing statistics."""
    all_ids, all_labels = dataset["input_ids"], dataset["labels"]
    lengths = [len(ids) for ids in all_ids]
    bins = best_fit_decreasing(lengths, max_length)
    # Rows in order of their first example's index, so the packed order does not depend on lengths.
    bins.sort(key=min)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        input_ids, labels, positions = [], [], []
        for i in sorted(members):
            input_ids += all_ids[i]
            labels += [IGNORE_INDEX] + list(all_labels[i][1:])
            positions += range(lengths[i])
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
    stats = {
        "examples": len(lengths),
        "packed_rows": len(bins),
        "packing_efficiency": sum(lengths) / max(len(bins) * max_length, 1),
    }
    return datasets.Dataset.from_dict(rows), stats
