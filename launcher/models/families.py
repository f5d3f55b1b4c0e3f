"""What differs between model families (Llama, Qwen2/3, Mistral, Gemma), in one place.

Everything else in ftl works from what transformers exposes for every architecture (configs,
``get_decoder``, ``_no_split_modules``); the tables here are the few facts that are per family:
tokens their vocabularies keep for padding, the module classes the kernels replace, config keys
whose names vary, and the shapes of well-known checkpoints for planning without a download.
"""

from __future__ import annotations

from typing import Any

import torch

from ftl.errors import UserError

# Tokens that vocabularies keep for padding, or reserve unused, in the order they are preferred:
# Llama 3.x's finetune pad, then the <pad>/[PAD] of Mistral, Gemma and BERT-style vocabularies, then
# Llama 3's reserved specials.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "<|pad|>", "[PAD]",
                  "<|reserved_special_token_0|>", "<|reserved_special_token_2|>")

# RMSNorm classes and their weight offset (Gemma scales by 1 + weight), for the rmsnorm kernel.
RMSNORMS = {"LlamaRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "MistralRMSNorm": 0.0, "Qwen3RMSNorm": 0.0,
            "GemmaRMSNorm": 1.0, "Gemma2RMSNorm": 1.0}
# Gated-SiLU MLP classes (gate_proj, up_proj, down_proj), for the swiglu kernel.
MLPS = ("LlamaMLP", "Qwen2MLP", "MistralMLP", "Qwen3MLP")
# The linear layers of one decoder block, as these families name them (LoRA targets, memory plan).
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Architectures of common hub models, for planning on a machine that cannot download config.json.
KNOWN_SHAPES = {
    "llama-3.1-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False),
    "llama-3.1-70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=128256, tied=False),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064, tied=False),
    "mistral-7b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32768, tied=False),
}


class ArchitectureError(UserError):
    """The model lacks a part a setting needs (decoder layers to shard or compile)."""


def head_dim(config: Any) -> int:
    """Per-head width: ``head_dim`` where the config has one (Gemma, Qwen3: not hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: Any) -> int:
    """Key/value heads: fewer than the query heads under grouped-query attention."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack (embeddings, layers, final norm, rotary embedding) whose output is the
    final normed hidden state; None for a model without a separate one."""
    base = base_model(model)
    stack = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
    return stack if isinstance(stack, torch.nn.Module) and stack is not base else None


def decoder_layers(model: torch.nn.Module, needed_by: str, instead: str) -> list[torch.nn.Module]:
    """The repeated blocks, by the class names transformers lists in ``_no_split_modules``
    (``needed_by`` and ``instead`` word the error when there are none)."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ArchitectureError(f"{needed_by} found no decoder layers in {type(base).__name__} "
                                f"(_no_split_modules={sorted(names)}); {instead}")
    return layers
