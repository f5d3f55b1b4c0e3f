"""Precision: the one vocabulary of dtypes and the one table behind it.

Recipes name weights' dtypes as torch does (``float32``, ``bfloat16``, ``float16``) and mixed precision
as Accelerate does (``no``, ``bf16``, ``fp16``); each field takes the other spelling too (``bf16`` for
``model.dtype``, ``bfloat16`` for ``train.mixed_precision``), mapped here once, when the recipe is read.
Every other module asks this one for torch dtypes and sizes.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# How else users write them (Accelerate, DeepSpeed and Axolotl recipes say bf16/fp16/fp32).
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
MIXED_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "no", "fp32": "no", "none": "no"}
MIXED: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed_precision -> autocast dtype


def dtype_name(value: Any) -> Any:
    """A dtype field's value in the recipe's vocabulary (``bf16`` -> ``bfloat16``); others unchanged."""
    return DTYPE_ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value


def mixed_name(value: Any) -> Any:
    """A mixed-precision value in Accelerate's vocabulary (``bfloat16`` -> ``bf16``); others unchanged."""
    return MIXED_ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value


def torch_dtype(name: str) -> torch.dtype | str:
    """The torch dtype of a recipe dtype name; ``auto`` (the checkpoint's own) stays ``auto``."""
    return "auto" if name == "auto" else DTYPES[name]


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype ``train.mixed_precision`` computes in under autocast; None for no mixed precision."""
    return MIXED.get(mixed_precision)


def mixed_dtype_name(mixed_precision: str) -> str | None:
    """``bf16`` -> ``bfloat16``: what FSDP's MixedPrecisionPolicy and DeepSpeed call it."""
    dtype = autocast_dtype(mixed_precision)
    return None if dtype is None else next(name for name, d in DTYPES.items() if d == dtype)
