"""Merge a LoRA adapter into its base model one output shard at a time.

The base model is never loaded as a model: its safetensors files are memory-mapped and each output
shard reads only the tensors it holds, adds the adapter's delta to the targeted weights and is
written before the next one is read, so peak memory is about one output shard however large the
model is. peft's formulas, applied per weight (``W`` with shape out x in):

- LoRA: ``W + s * B @ A`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)
- DoRA: ``m / ||W + s * B @ A||_row * (W + s * B @ A)``, the norm over each output row
- QLoRA, ``qlora_merge: dequantized``: ``W`` is first NF4/FP4-quantized and dequantized exactly as
  bitsandbytes did when training loaded it, so the merged model is the model that was trained;
  ``original`` merges into the full-precision weights (what some tools do; logits then move).

Shards are planned with huggingface_hub's ``split_torch_state_dict_into_shards`` and written with
safetensors, so the index is the standard ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftl.errors import UserError, first_line
from ftl.checkpoints.weights import INDEX, safetensors_files

log = logging.getLogger(__name__)

_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?:\.weight)?$")


class MergeError(UserError):
    """The adapter cannot be merged (unsupported layer type, mismatched base)."""


@dataclass
class TensorSource:
    """Names, shapes and lazy loaders of a model's tensors (from safetensors files or a dict)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    loaders: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, directory: Path) -> TensorSource:
        try:
            files = safetensors_files(directory)
        except UserError as err:
            raise MergeError(f"{err} (export needs safetensors weights)") from None
        source = cls()
        for path in files:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    source.shapes[key] = tuple(f.get_slice(key).get_shape())
                    source.loaders[key] = lambda path=path, key=key: _read(path, key)
        return source

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TensorSource:
        return cls({k: tuple(v.shape) for k, v in state.items()}, {k: (lambda v=v: v) for k, v in state.items()})

    def drop(self, name: str) -> None:
        """Leave a tensor out (a causal LM's ``lm_head`` under a reward model's score head)."""
        self.shapes.pop(name, None)
        self.loaders.pop(name, None)


def _read(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


@dataclass
class Adapter:
    """A PEFT LoRA adapter as merge needs it: per base weight, A, B, scale and DoRA magnitude."""

    scale: dict[str, float]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    magnitude: dict[str, torch.Tensor]
    replaced: dict[str, torch.Tensor]  # modules_to_save: whole tensors that replace the base's

    @classmethod
    def load(cls, directory: Path) -> Adapter:
        config = json.loads((directory / "adapter_config.json").read_text())
        if config.get("peft_type") != "LORA":
            raise MergeError(f"{directory}: only LoRA adapters can be merged (found {config.get('peft_type')})")
        if config.get("fan_in_fan_out") or config.get("alpha_pattern") or config.get("lora_bias"):
            raise MergeError(f"{directory}: fan_in_fan_out, alpha_pattern and lora_bias adapters are not supported by the merge")
        try:
            state = load_file(directory / "adapter_model.safetensors")
        except Exception as err:  # safetensors' own errors: an empty, truncated or foreign file
            raise MergeError(f"{directory / 'adapter_model.safetensors'}: not a readable safetensors file ({first_line(err)}); "
                             "export another checkpoint") from None
        adapter = cls({}, {}, {}, {}, {})
        for key, tensor in state.items():
            if "lora_embedding" in key:
                raise MergeError(f"{directory}: LoRA on embeddings ({key}) is not supported by the merge; train with target_modules on linear layers")
            match = _LORA_KEY.match(key)
            if match is None:
                # modules_to_save: saved under the module's own name.
                adapter.replaced[key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")] = tensor
                continue
            module, kind = match.groups()
            weight = f"{module}.weight"
            {"lora_A": adapter.a, "lora_B": adapter.b, "lora_magnitude_vector": adapter.magnitude}[kind][weight] = tensor
        for weight, a in adapter.a.items():
            r = a.shape[0]
            alpha = config["lora_alpha"]
            adapter.scale[weight] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        return adapter

    def touches(self, name: str) -> bool:
        return name in self.a or name in self.replaced

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32) with this adapter merged into it."""
        if name in self.replaced:
            return self.replaced[name].float()
        if name not in self.a:
            return weight
        merged = weight + self.scale[name] * (self.b[name].float() @ self.a[name].float())
        if name in self.magnitude:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.magnitude[name].float() / norm).view(-1, 1) * merged
        return merged


@dataclass
class Quantizer:
    """The bitsandbytes 4-bit round trip that training applied to the base's linear weights: quantized
    from the dtype training loaded them in (the tensor given), dequantized into the compute dtype, as
    bitsandbytes' 4-bit matmul does."""

    weights: set[str]  # names of the weights bitsandbytes quantized
    quant_type: str
    double_quant: bool
    quant_storage: torch.dtype
    compute_dtype: torch.dtype

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.weights:
            return weight
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(
            weight.contiguous(), blocksize=64, compress_statistics=self.double_quant,
            quant_type=self.quant_type, quant_storage=self.quant_storage,
        )
        state.dtype = self.compute_dtype
        return F.dequantize_4bit(packed, state).float()


def plan_shards(source: TensorSource, dtype: torch.dtype, max_shard_size: str | int) -> tuple[dict[str, list[str]], dict | None]:
    """Output files -> tensor names, and the index (None for one file), planned on meta tensors."""
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in source.shapes.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename} if split.is_sharded else None
    return split.filename_to_tensors, index


@dataclass
class Merge:
    """What an export writes: the source tensors with the adapter merged in (and, for QLoRA, the 4-bit
    round trip training applied), computed in float32 one tensor at a time. ``ftl export`` writes
    it rounded to the export dtype and verifies the float32 result against the trained model.

    ``base_dtype`` is the dtype training loaded the base in (``model.dtype``): a float32 base trained
    as bf16 was trained as its bf16 rounding, so that rounding is what the adapter is merged into."""

    source: TensorSource
    adapter: Adapter | None = None
    quantizer: Quantizer | None = None
    base_dtype: torch.dtype | None = None
    head: str = "lm_head.weight"  # the output head: the base may lack it (tied embeddings; a new score head)

    def __post_init__(self) -> None:
        if self.adapter is None:
            return
        missing = sorted((set(self.adapter.a) | set(self.adapter.replaced)) - set(self.source.shapes))
        extra = [m for m in missing if not m.endswith(self.head)]
        if extra:
            raise MergeError(f"the adapter targets weights the base model does not have: {', '.join(extra[:3])}")
        # A trained lm_head on a model with tied embeddings becomes its own tensor; a score head is new.
        for name in missing:
            self.source.shapes[name] = tuple(self.adapter.replaced[name].shape)
            self.source.loaders[name] = lambda name=name: self.adapter.replaced[name]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (untouched) or, where the merge changes it, in float32."""
        tensor = self.source.loaders[name]()
        if self.base_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.base_dtype)
        changed = (self.adapter is not None and self.adapter.touches(name)) or (
            self.quantizer is not None and name in self.quantizer.weights)
        if changed:
            if self.quantizer is not None:
                tensor = self.quantizer(name, tensor)
            tensor = tensor.float()
            if self.adapter is not None:
                tensor = self.adapter.merge(name, tensor)
        return tensor

    def float32_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.float() if t.is_floating_point() else t for name in self.source.shapes for t in [self.tensor(name)]}


def write_merged(merge: Merge, out_dir: Path, dtype: torch.dtype, max_shard_size: str | int) -> list[str]:
    """Write the merge as safetensors shards of ``dtype``; returns the file names."""
    shards, index = plan_shards(merge.source, dtype, max_shard_size)
    for filename, names in shards.items():
        tensors = {}
        for name in names:
            tensor = merge.tensor(name)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", filename, len(tensors))
        del tensors
    if index is not None:
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    return sorted(shards)
