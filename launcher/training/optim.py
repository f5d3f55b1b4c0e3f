"""Optimizers by name: torch's fused AdamW, or bitsandbytes' 8-bit and paged AdamW.

8-bit AdamW keeps both moments in blockwise-quantized uint8 (bitsandbytes keeps tensors under
4,096 elements in 32 bits, where quantization would save nothing). Paged optimizers page their
state to CPU memory under GPU memory pressure; without CUDA, bitsandbytes falls back to the
non-paged version with a warning of its own, which the console shows once.
"""

from __future__ import annotations

from typing import Any

import torch

from ftl.recipe.schema import TrainSection


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as is standard for transformers."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; keep counts equal everywhere


def build_optimizer(model: torch.nn.Module, cfg: TrainSection, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """``cpu_adam``: DeepSpeed's vectorised CPU AdamW, which ZeRO optimizer offload steps with."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if cfg.optimizer == "adamw_torch":
        # The fused kernel updates each parameter in one pass: faster than the foreach default, and
        # without its temporaries (a list the size of a state), which set the peak of a full fine-tune.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    import bitsandbytes as bnb

    optimizers = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return optimizers[cfg.optimizer](groups, **kwargs)
