"""RMSNorm, y = x / rms(x) * (offset + weight), computed in fp32 (offset 1 is Gemma's variant).

One Triton program per row: the forward stores 1/rms per row for the backward, which computes
dx in the same pass and per-row weight-gradient partials that torch sums (deterministic).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (offset + weight.float())).to(x.dtype)


if triton is not None:

    @triton.jit
    def _forward(X, W, Y, RSTD, n_cols, eps, offset, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        tl.store(Y + row * n_cols + cols, (x * rstd * (offset + w)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward(DY, X, W, RSTD, DX, DW, n_cols, offset, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x * rstd
        wdy = dy * (offset + w)
        dx = rstd * (wdy - normed * (tl.sum(wdy * normed, axis=0) / n_cols))
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW + row * n_cols + cols, dy * normed, mask=mask)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        _forward[(rows,)](x2, weight, y, rstd, cols, float(eps), float(offset), BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.block, ctx.shape = offset, block, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        dw_rows = torch.empty(rows, cols, dtype=torch.float32, device=x2.device)
        _backward[(rows,)](dy2, x2, weight, rstd, dx, dw_rows, cols, float(ctx.offset), BLOCK=ctx.block)
        return dx.reshape(ctx.shape), dw_rows.sum(0).to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        return _RMSNormTriton.apply(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)


class RMSNorm(torch.nn.Module):
    """Drop-in for Llama/Qwen2/Mistral (offset 0) and Gemma (offset 1) RMSNorm; keeps their ``weight``."""

    def __init__(self, weight: torch.nn.Parameter, eps: float, offset: float = 0.0, backend: str = "torch"):
        super().__init__()
        self.weight = weight
        self.eps, self.offset, self.backend = eps, offset, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, backend={self.backend}"
