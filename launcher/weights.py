"""Weight files and dtypes: the one table from recipe dtype names to torch dtypes, and the one
reader of a directory's safetensors files (single file or sharded with the standard index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftl.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"


def safetensors_files(directory: Path) -> list[Path]:
    """The model's safetensors files in ``directory``: the index's shards, or ``model.safetensors``."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (expected a weight_map)") from None
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise UserError(f"{directory}: no model.safetensors or {INDEX}")
