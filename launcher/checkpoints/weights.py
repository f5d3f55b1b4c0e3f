"""Weight files: the one reader of a directory's safetensors files (single file or sharded with the
standard index), and the identity of a base model's weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


from ftl.errors import UserError

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


SAMPLE = 1 << 20  # bytes of tensor data read from each end of a safetensors file


def weights_identity(path: str | Path) -> str | None:
    """A fingerprint of the model at ``path`` that changes when its weights do: per weight file its
    name, size, safetensors header and the first and last MiB of its tensor data (a fine-tune of the
    same base has the same shapes and header, not the same bytes). Cheap at any model size, and a
    copy of the same files has the same identity. None for a path that is not a local directory
    (a hub id names immutable snapshots)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return None
    try:
        files = safetensors_files(directory)
    except UserError:
        files = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.gguf"))
    digest = hashlib.sha256()
    for file in [directory / "config.json", *files]:
        if not file.is_file():
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with open(file, "rb") as f:
            digest.update(f.read(SAMPLE + 8 + _header_size(f)))  # header and the first MiB of data
            f.seek(max(0, size - SAMPLE))
            digest.update(f.read(SAMPLE))
    return digest.hexdigest()[:16]


def _header_size(f: Any) -> int:
    """The length of a safetensors header (its first 8 bytes, little endian); 0 for other files."""
    head = f.read(8)
    f.seek(0)
    return int.from_bytes(head, "little") if len(head) == 8 and int.from_bytes(head, "little") < 1 << 28 else 0
