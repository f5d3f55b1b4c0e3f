"""A plain peft LoRA adapter trained elsewhere (TRL, Axolotl, a notebook), as ``ftl export`` takes it.

Such a directory has ``adapter_config.json`` and ``adapter_model.safetensors`` but no run: no
recipe, no trainer state. The base is ``--base`` or the adapter config's ``base_model_name_or_path``
(a local directory or the Hugging Face cache). What a run would record is unknown: the training
data, the dtype the base was loaded in, whether it was quantized. So the export merges into the
base as stored and verifies against peft's own base + adapter (float32), and ``verify.json`` says
what could not be known.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftl.recipe.schema import Recipe
from ftl.recipe.load import validate_recipe
from ftl.errors import UserError

UNKNOWN = ("no training recipe: the training data, the dtype the base was trained in and any quantization are unknown; "
           "merged into the base as stored and verified against peft's base + adapter in float32")


def is_plain_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def adapter_recipe(path: Path, base: str | None, local_dir) -> Recipe:
    """The recipe an export of the adapter at ``path`` needs: its base (``--base`` or the adapter's
    own ``base_model_name_or_path``, found locally by ``local_dir``), LoRA, the export's defaults."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{path / 'adapter_config.json'}: not readable JSON") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: only LoRA adapters can be merged (found {config.get('peft_type')})")
    named = base or config.get("base_model_name_or_path")
    if not named:
        raise UserError(f"{path}: the adapter names no base model (base_model_name_or_path); pass --base DIR")
    base_dir = local_dir(named)
    return validate_recipe({
        "model": {"path": str(base_dir), "dtype": "auto"},
        "data": {"train": {"path": str(path / "(no training data)"), "format": "completion"}},
        "method": {"type": "lora", "lora": {"r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8))}},
        "output": {"dir": str(path)},
    }, source=str(path / "adapter_config.json"))
