"""Each kernel against its PyTorch reference: forward and gradients, fp32/bf16/fp16, odd sizes.

The Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest before any kernel is defined). Tolerances: fp32 1e-5; bf16 two units in the last place
(the interpreter truncates fp32->bf16 casts instead of rounding); fp16 2e-3 relative.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ftl.kernels.fused_ce import linear_cross_entropy, linear_cross_entropy_reference
from ftl.kernels.rmsnorm import rms_norm, rms_norm_reference
from ftl.kernels.swiglu import swiglu, swiglu_reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=2**-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = list(TOL)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.allclose(a.float(), b.float(), **TOL[dtype])


def grads(fn, *inputs):
    """Output and input gradients of ``fn`` for a fixed random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return [out.detach()] + [x.grad for x in leaves]


def test_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama-style, Gemma-style (1 + weight)
def test_rmsnorm_matches_reference(dtype, offset):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 67).to(dtype)  # hidden size not a power of two
    w = (torch.randn(67) * 0.1 + (0 if offset else 1)).to(dtype)
    triton_out = grads(lambda a, b: rms_norm(a, b, 1e-6, offset, backend="triton"), x, w)
    ref_out = grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset), x, w)
    for got, want in zip(triton_out, ref_out):
        assert close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(dtype):
    torch.manual_seed(0)
    gate, up = torch.randn(3, 7, 331).to(dtype), torch.randn(3, 7, 331).to(dtype)  # 6,951 elements: not a block multiple
    for got, want in zip(grads(lambda g, u: swiglu(g, u, backend="triton"), gate, up), grads(swiglu_reference, gate, up)):
        assert close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_cross_entropy_matches_reference(dtype, smoothing, backend):
    torch.manual_seed(0)
    hidden, weight = torch.randn(45, 40).to(dtype), (torch.randn(301, 40) * 0.2).to(dtype)  # vocab 301, chunk 16
    labels = torch.randint(0, 301, (45,))
    labels[16:32] = -100  # one whole chunk ignored
    labels[40:] = -100
    fused = grads(lambda h, w: linear_cross_entropy(h, w, labels, chunk=16, label_smoothing=smoothing, backend=backend), hidden, weight)
    ref = grads(lambda h, w: linear_cross_entropy_reference(h.float(), w.float(), labels, label_smoothing=smoothing), hidden, weight)
    loose = torch.float32 if dtype == torch.float32 else torch.bfloat16  # the reference computes in fp32
    for got, want in zip(fused, ref):
        assert close(got, want, loose)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_cross_entropy_with_every_label_ignored_is_zero_with_zero_gradients(backend):
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((10,), -100), chunk=4, backend=backend)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_fused_cross_entropy_with_a_frozen_head_only_returns_the_hidden_gradient():
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(50, 8)
    labels = torch.randint(0, 50, (10,))
    linear_cross_entropy(hidden, weight, labels, chunk=3).backward()
    expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), labels, reduction="sum"), hidden)[0]
    assert torch.allclose(hidden.grad, expected, atol=1e-5)


@pytest.mark.parametrize("trained_head", [True, False])
def test_fused_cross_entropy_under_autocast_computes_what_autocast_computes(trained_head):
    """Under bf16 autocast (fp32 hidden states and head, as in a LoRA run): the loss and the fp32
    gradients of lm_head + cross-entropy under the same autocast, to bf16 precision."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(45, 40), torch.randn(301, 40) * 0.2
    labels = torch.randint(0, 301, (45,))
    labels[40:] = -100
    runs = {}
    for name, fn in [("fused", lambda h, w: linear_cross_entropy(h, w, labels, chunk=16)),
                     ("autocast", lambda h, w: F.cross_entropy((h @ w.t()).float(), labels, reduction="sum"))]:
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(trained_head)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w)
        loss.backward()
        runs[name] = [loss.detach(), h.grad] + ([w.grad] if trained_head else [])
    for got, want in zip(runs["fused"], runs["autocast"]):
        assert got.dtype == want.dtype and close(got, want, torch.bfloat16)


@pytest.mark.parametrize("case", ["rmsnorm offset", "swiglu gelu", "fused_ce smoothing"])
def test_each_comparison_can_fail(case):
    """The tolerances above are tight enough to catch a slightly different function."""
    torch.manual_seed(0)
    if case == "rmsnorm offset":
        x, w = torch.randn(4, 67), torch.randn(67)
        got, want = rms_norm(x, w, 1e-6, 0.0, backend="triton"), rms_norm_reference(x, w * 1.001, 1e-6)
    elif case == "swiglu gelu":
        g, u = torch.randn(500), torch.randn(500)
        got, want = swiglu(g, u, backend="triton"), F.gelu(g) * u
    else:
        h, w, y = torch.randn(20, 16), torch.randn(64, 16), torch.randint(0, 64, (20,))
        got, want = linear_cross_entropy(h, w, y, chunk=8, backend="triton"), linear_cross_entropy_reference(h, w, y, label_smoothing=1e-3)
    assert not close(got, want, torch.float32)
