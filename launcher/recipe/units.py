"""Sizes and durations as users write them in recipes and on the command line."""

from __future__ import annotations

import math
import re


def parse_size(text: str) -> float | None:
    """A shard size as huggingface_hub's sharding accepts it ('5GB', '500MB') in bytes; None if it is not one."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])B\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        return None
    return float(match.group(1)) * 1000 ** " KMGT".index(match.group(2).upper())


def parse_gib(text: str) -> float | None:
    """'80GB', '80G', '80GiB', '24000MB' -> GiB (None if not a size). Units are binary, as in Slurm (an '80GB' card is 80 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])?i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        return None
    scale = {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[(match.group(2) or "G").upper()]
    value = float(match.group(1)) * scale
    return value if math.isfinite(value) else None  # (400 digits overflow to inf)


def slurm_seconds(value: str) -> int | None:
    """Seconds in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


