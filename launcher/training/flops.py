"""Model FLOPs per trained token, and the peak FLOP/s of known accelerators, for MFU.

Counted from the parameters of the model's matmuls (every ``nn.Linear``, including ``lm_head``;
embedding lookups are not matmuls) plus attention, in the convention of the PaLM paper:

- a trainable matmul weight costs 6 FLOPs per parameter per token (forward 2, backward 4: the
  gradients of its input and of the weight);
- a frozen one (the base under LoRA/QLoRA) costs 4: forward 2 and the input gradient 2 that the
  adapters below it need; no weight gradient. (Counting 6 for it, as some tools do, inflates MFU.)
- attention scores and values: 12 x layers x (heads x head_dim) x sequence length per token
  (forward 4, backward 8; causal masking not discounted, as in PaLM).

MFU = achieved model FLOP/s / (devices x peak FLOP/s of one device at the training dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ftl.models.families import head_dim

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters of the model's linear layers (quantized ones count in full)."""
    trainable = frozen = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            count = module.in_features * module.out_features  # 4-bit weights are packed: use the shape
            if weight.requires_grad:
                trainable += count
            else:
                frozen += count
    return trainable, frozen


def flops_per_token(trainable: int, frozen: int, layers: int, attention_width: int, seq_len: float) -> float:
    return 6.0 * trainable + 4.0 * frozen + 12.0 * layers * attention_width * seq_len


def flops_counter(model: torch.nn.Module) -> Callable[[float], float]:
    """FLOPs per token as a function of the mean sequence length, for an (unwrapped) model."""
    config = model.config
    width = config.num_attention_heads * head_dim(config)
    trainable, frozen = matmul_params(model)
    return lambda seq_len: flops_per_token(trainable, frozen, config.num_hidden_layers, width, seq_len)


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of this process's device: the recipe's value, the table's, or None (unknown, CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib() -> float:
    """Peak device memory of this process: CUDA allocations, or peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return proc_status_gib("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def proc_status_gib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in GiB, from /proc (Linux). Unlike
    ru_maxrss, VmHWM does not carry over a fork; writing 5 to /proc/self/clear_refs resets it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise OSError(f"no {field} in /proc/self/status")
