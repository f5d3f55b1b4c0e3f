"""Swap ftl's kernels into a loaded transformers model, by module type, without touching library code.

- ``rmsnorm``: every known RMSNorm module becomes ``ftl.kernels.rmsnorm.RMSNorm`` holding the same
  weight Parameter (Gemma's ``1 + weight`` variant included);
- ``swiglu``: every known SiLU-gated MLP becomes ``ftl.kernels.swiglu.SwiGLUMLP`` around the same
  projections (state dict names, LoRA targets and checkpoints are unchanged);
- ``fused_ce``: the loss is computed from the decoder's final hidden states and the output
  embedding by ``ftl.kernels.fused_ce`` (see ``FusedLoss``); the model is asked for one logit only.

An architecture without the modules a kernel needs is an error naming what was looked for, never a
silent no-op. ``auto`` means every kernel the model supports: Triton on CUDA, the PyTorch
references elsewhere; what it skips is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ftl.models.families import MLPS, RMSNORMS, base_model, decoder
from ftl.kernels.fused_ce import linear_cross_entropy
from ftl.kernels.rmsnorm import RMSNorm
from ftl.kernels.swiglu import SwiGLUMLP

log = logging.getLogger(__name__)

KERNELS = ("rmsnorm", "swiglu", "fused_ce")
# What ``auto`` applies with each backend. The PyTorch references of RMSNorm and SwiGLU are there
# to check the Triton kernels and to run them anywhere; on CPU they are slower than transformers'
# own modules (SmolLM2-135M LoRA in benchmarks/peers.py: bf16 274 against 293 tokens/s, fp32 2%
# slower and 0.5 GiB more RSS), so there ``auto`` is the fused cross-entropy alone.
AUTO = {"triton": KERNELS, "torch": ("fused_ce",)}
class KernelError(ValueError):
    """A requested kernel cannot apply to this model."""


def backend_for(device: torch.device | str) -> str:
    """Triton where it compiles (CUDA), the PyTorch references elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def _replace(model: torch.nn.Module, match: Callable[[torch.nn.Module], bool], build: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    targets = [(name, module) for name, module in model.named_modules() if name and match(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, build(module))


def _patch_rmsnorm(model: torch.nn.Module, backend: str) -> None:
    def build(norm: torch.nn.Module) -> torch.nn.Module:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None or not isinstance(getattr(norm, "weight", None), torch.nn.Parameter):
            raise KernelError(f"kernels: rmsnorm: {type(norm).__name__} has no weight/eps attributes; use kernels: none")
        return RMSNorm(norm.weight, float(eps), RMSNORMS[type(norm).__name__], backend)

    _replace(model, lambda m: type(m).__name__ in RMSNORMS, build)


def _patch_swiglu(model: torch.nn.Module, backend: str) -> None:
    def build(mlp: torch.nn.Module) -> torch.nn.Module:
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts):
            raise KernelError(f"kernels: swiglu: {type(mlp).__name__} has no gate_proj/up_proj/down_proj; leave swiglu out")
        return SwiGLUMLP(*parts, backend=backend)

    _replace(model, lambda m: type(m).__name__ in MLPS, build)


def check(model: torch.nn.Module, kernel: str) -> None:
    """Raise ``KernelError`` saying why ``kernel`` cannot apply to ``model``."""
    names = {type(m).__name__ for m in model.modules()}
    if kernel == "rmsnorm":
        if not names & set(RMSNORMS):
            raise KernelError(f"kernels: rmsnorm: no known RMSNorm in {type(model).__name__} (known: {', '.join(RMSNORMS)})")
    elif kernel == "swiglu":
        if not names & set(MLPS):
            raise KernelError(f"kernels: swiglu: no known gated MLP in {type(model).__name__} (known: {', '.join(MLPS)})")
        act = getattr(model.config, "hidden_act", None)
        if act not in ("silu", "swish"):
            raise KernelError(f"kernels: swiglu: the model's MLP activation is {act!r}, not SiLU; leave swiglu out")
    elif kernel == "fused_ce":
        output_head(model), _decoder(model)  # the loss is computed from them
    else:
        raise KernelError(f"kernels: unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")


def apply(model: torch.nn.Module, kernels: list[str], backend: str) -> list[str]:
    """Patch ``model`` (a transformers model, before or after LoRA wrapping) in place; returns what applied.

    ``fused_ce`` is not a module swap: it is returned so the training loop builds a ``FusedLoss``.
    """
    for kernel in kernels:
        check(model, kernel)
        if kernel == "rmsnorm":
            _patch_rmsnorm(model, backend)
        elif kernel == "swiglu":
            _patch_swiglu(model, backend)
    return list(kernels)


def supported(model: torch.nn.Module, backend: str) -> list[str]:
    """The kernels ``auto`` applies to this model with ``backend``; each one the model cannot take
    is logged with the reason."""
    chosen = []
    for kernel in AUTO[backend]:
        try:
            check(model, kernel)
            chosen.append(kernel)
        except KernelError as err:
            log.info("kernels auto: %s not used for %s: %s", kernel, type(model).__name__, err)
    return chosen


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose output is the final (normed) hidden state."""
    stack = decoder(model)
    if stack is None:
        raise KernelError(f"kernels: fused_ce: {type(base_model(model)).__name__} has no separate decoder (get_decoder); "
                          "leave fused_ce out")
    return stack


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose weight projects hidden states to logits (peft's modules_to_save copy if any)."""
    head = model.get_output_embeddings()
    active = getattr(head, "modules_to_save", None)
    if active is not None:  # peft ModulesToSaveWrapper: the trained copy is the one in use
        head = active[head.active_adapters[0]]
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise KernelError(f"kernels: fused_ce: the output embedding is {type(head).__name__}, not a bias-free Linear "
                          "(a LoRA- or quantized lm_head); leave fused_ce out")
    return head


class FusedLoss:
    """Sum of next-token cross-entropy from the decoder's last hidden state, never the full logits.

    A forward hook on the decoder (public API) captures its output while the model runs as usual
    through its wrappers (DDP, DeepSpeed, peft), asked for a single logit.
    """

    def __init__(self, model: torch.nn.Module, chunk: int | None = None, backend: str = "torch"):  # chunk None: chunk_size
        self.head = output_head(model)  # the same module through DDP/DeepSpeed wrapping (not FSDP2/ZeRO-3)
        self.decoder = _decoder(model)
        self.chunk, self.backend = chunk, backend
        self._hidden: torch.Tensor | None = None
        self._armed = False  # only our own forward is captured (not eval, not generation)
        self.decoder.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        self._armed = True
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            self._armed = False
        hidden, self._hidden = self._hidden, None
        shifted = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return linear_cross_entropy(shifted, self.head.weight, labels[:, 1:].reshape(-1), chunk=self.chunk, backend=self.backend)
