"""Linear + cross-entropy without the full logits: ``sum_i CE(hidden_i @ W.T, label_i)``.

The naive loss holds tokens x vocab logits several times over (the logits, their fp32 copy, the
softmax and its gradient: ~16 bytes per entry, 4 GiB for 8k tokens x 128k vocabulary). This
computes them a chunk of tokens at a time (``chunk_size``) and turns each chunk straight into its gradients with
respect to the hidden states and the weight, during the forward, so only one chunk of logits
ever exists. The backward just scales the stored gradients. Works on any device (matmuls do the
work); it is also the fallback wherever Triton cannot run.

Returns the *sum* over non-ignored tokens (the training loop divides by the step's trainable
tokens). Label smoothing ``eps`` mixes in the uniform distribution: (1-eps) NLL + eps mean(-log p).
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum",
                                             label_smoothing=label_smoothing) if (labels != ignore_index).any() else logits.sum() * 0


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, ignore_index, label_smoothing):
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            valid = y != ignore_index
            if not valid.any():
                continue
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            loss = (1 - label_smoothing) * (lse - target) + label_smoothing * (lse - logits.mean(-1))
            total += (loss * valid).sum()
            grad = torch.softmax(logits, dim=-1)  # d loss / d logits, in place of the logits
            grad.scatter_add_(1, y.clamp(min=0).unsqueeze(1), torch.full_like(target, -(1 - label_smoothing)).unsqueeze(1))
            if label_smoothing:
                grad -= label_smoothing / vocab
            grad *= valid.unsqueeze(1)
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
        return grad_hidden, grad_weight, None, None, None, None


def chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so that a chunk of logits is about as large as the hidden states (as
    Liger-Kernel sizes them): a power of two between 16 and 1,024."""
    target = max(1, math.ceil(tokens * hidden / vocab))
    return max(16, min(1024, 2 ** math.ceil(math.log2(target))))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None,
                         ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden (N, d) @ weight (V, d).T`` against ``labels (N,)``."""
    chunk = chunk or chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, ignore_index, label_smoothing)
