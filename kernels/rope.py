"""Rotary position embedding applied to q and k in place (the rotate-half convention of Llama,
Qwen2, Mistral and Gemma): x * cos + rotate_half(x) * sin, with cos/sin of shape (B, T, D).

The Triton version rotates each (batch, head, position) row in place, so neither q nor k is
copied, and its backward is the inverse rotation (by -sin) of the incoming gradient.

Not swapped into models by ``ftl.kernels.patch``: transformers applies RoPE through a module-level
function inside each attention forward, which cannot be replaced without patching library code.
It is for training code that owns its attention (and is tested against the reference).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return ((q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype),
            (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype))


if triton is not None:

    @triton.jit
    def _rotate(X, COS, SIN, heads, seq, half, sign, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # (batch, head, position) of a (B, H, T, D) tensor
        b = row // (heads * seq)
        t = row % seq
        cols = tl.arange(0, BLOCK)
        mask = cols < half
        base = row * 2 * half
        trig = (b * seq + t) * 2 * half
        x1 = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + base + half + cols, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(COS + trig + cols, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + trig + cols, mask=mask, other=0.0).to(tl.float32) * sign
        tl.store(X + base + cols, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
        tl.store(X + base + half + cols, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    batch, heads, seq, dim = x.shape
    _rotate[(batch * heads * seq,)](x, cos, sin, heads, seq, dim // 2, sign, BLOCK=triton.next_power_of_2(dim // 2))


class _RopeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        for x in (q, k):
            _rotate_(x, cos, sin, 1.0)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = dq.contiguous().clone(), dk.contiguous().clone()
        for g in (dq, dk):
            _rotate_(g, cos, sin, -1.0)  # the transpose of a rotation is the rotation by -angle
        return dq, dk, None, None


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, H_kv, T, D) by position; in place with ``backend="triton"``
    (q and k must then be contiguous and not leaves that require grad)."""
    if backend == "triton":
        return _RopeTriton.apply(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)
