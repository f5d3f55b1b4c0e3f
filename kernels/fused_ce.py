"""Linear + cross-entropy without the full logits: ``sum_i CE(hidden_i @ W.T, label_i)``.

The naive loss holds tokens x vocab logits several times over (the logits, their fp32 copy, the
softmax and its gradient: ~16 bytes per entry, 4 GiB for 8k tokens x 128k vocabulary). This
computes them a chunk of tokens at a time (``chunk_size``) and turns each chunk straight into its gradients with
respect to the hidden states and the weight, during the forward, so only one chunk of logits
ever exists. The backward just scales the stored gradients. The matmuls are torch's; the per-chunk
loss and softmax gradient are a Triton kernel (one pass of online log-sum-exp, then the gradient
written over the logits) or, on any device, the same in PyTorch, the fallback wherever Triton
cannot run.

Returns the *sum* over non-ignored tokens (the training loop divides by the step's trainable
tokens). Label smoothing ``eps`` mixes in the uniform distribution: (1-eps) NLL + eps mean(-log p).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path still works
    triton = None

IGNORE_INDEX = -100


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum",
                                             label_smoothing=label_smoothing) if (labels != ignore_index).any() else logits.sum() * 0


def _chunk_loss_and_grad_torch(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-row loss of fp32 ``logits``, which are overwritten with d loss / d logits."""
    vocab = logits.shape[1]
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = (1 - smoothing) * (lse - target) + smoothing * (lse - logits.mean(-1))
    torch.softmax(logits, dim=-1, out=logits)
    logits.scatter_add_(1, y.clamp(min=0).unsqueeze(1), torch.full_like(target, -(1 - smoothing)).unsqueeze(1))
    if smoothing:
        logits -= smoothing / vocab
    logits *= valid.unsqueeze(1)
    return loss * valid


if triton is not None:

    @triton.jit
    def _chunk_kernel(LOGITS, LABELS, LOSS, n_cols, ignore_index, smoothing, BLOCK: tl.constexpr):
        """One row: online log-sum-exp over vocabulary blocks, then the gradient in place of the logits."""
        row = tl.program_id(0)
        ptr = LOGITS + row.to(tl.int64) * n_cols
        y = tl.load(LABELS + row)
        valid = (y != ignore_index).to(tl.float32)
        target = tl.load(ptr + tl.where(y != ignore_index, y, 0)).to(tl.float32)
        m = tl.full((), float("-inf"), tl.float32)
        d = tl.zeros((), tl.float32)
        total = tl.zeros((), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            total += tl.sum(tl.where(cols < n_cols, x, 0.0), axis=0)
        lse = m + tl.log(d)
        loss = (1.0 - smoothing) * (lse - target) + smoothing * (lse - total / n_cols)
        tl.store(LOSS + row, loss * valid)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - smoothing / n_cols
            g = tl.where(cols == y, g - (1.0 - smoothing), g)
            tl.store(ptr + cols, g * valid, mask=cols < n_cols)


def _chunk_loss_and_grad_triton(logits: torch.Tensor, y: torch.Tensor, ignore_index: int, smoothing: float) -> torch.Tensor:
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _chunk_kernel[(rows,)](logits, y.contiguous(), loss, vocab, ignore_index, float(smoothing), BLOCK=min(4096, triton.next_power_of_2(vocab)))
    return loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, ignore_index, label_smoothing, backend):
        n = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            valid = y != ignore_index
            if not valid.any():
                continue
            grad = (h @ weight.t()).float().contiguous()  # the logits, then d loss / d logits in their place
            if backend == "triton":
                total += _chunk_loss_and_grad_triton(grad, y, ignore_index, label_smoothing).sum()
            else:
                total += _chunk_loss_and_grad_torch(grad, y, valid, label_smoothing).sum()
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h.float())  # in place: no V x d temporary
        # Kept on ctx, not saved tensors: backward hands them over as the only reference, so autograd
        # takes them as .grad instead of copying (a copy would double the head's gradient memory).
        ctx.grads = [grad_hidden, grad_weight]
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_out)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_out).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunk_size(tokens: int, hidden: int, vocab: int, device: str = "cuda") -> int:
    """Tokens per chunk so that a chunk of logits is about as large as the hidden states (as
    Liger-Kernel sizes them): a power of two between 16 and 1,024. On CPU at least 512: skinnier
    matmuls run far below its matmul rate (2,044 tokens, vocabulary 152k, fp32: 64-token chunks
    took 1.6x as long as the unfused loss, 512-token chunks the same time)."""
    target = max(1, math.ceil(tokens * hidden / vocab))
    return max(16 if device == "cuda" else 512, min(1024, 2 ** math.ceil(math.log2(target))))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None,
                         ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, backend: str = "torch") -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden (N, d) @ weight (V, d).T`` against ``labels (N,)``.

    Under autocast the weight and hidden states are cast to its dtype once, here, and the chunks
    run without autocast: autocast would cast the (V, d) weight again for both matmuls of every
    chunk (it caches casts of trained leaf weights only, and a LoRA run's head is frozen), which
    made bf16 runs on CPU slower than without the kernel. Gradients reach the fp32 originals
    through the casts, as they do through autocast's."""
    device = hidden.device.type
    chunk = chunk or chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0], device)
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), labels, chunk, ignore_index,
                                                    label_smoothing, backend)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, ignore_index, label_smoothing, backend)
