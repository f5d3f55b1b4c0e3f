"""Peak memory (and, on GPU, time) of the loss step: fused linear cross-entropy vs lm_head + F.cross_entropy.

    python benchmarks/fused_ce_memory.py                  # CPU: peak RSS, fp32
    python benchmarks/fused_ce_memory.py --device cuda    # GPU: max_memory_allocated and ms, bf16

The loss step is forward and backward of sum CE(hidden @ W.T, labels) for hidden states (T x H)
and a head W (V x H) that is frozen (LoRA/QLoRA) or trained (full fine-tuning; its V x H gradient
is then part of the step's memory in every method). Every (method, shape) runs in its own process; the figure is the
memory the step adds on top of its inputs (CPU: growth of peak RSS; GPU: max_memory_allocated
minus what was allocated before the step). Methods: ``naive`` (logits, then F.cross_entropy on
their fp32 copy, as the training loop without kernels), ``fused`` (kernels/fused_ce.py: its Triton
chunk kernel on GPU, the PyTorch path on CPU), ``compiled`` (torch.compile of naive; GPU only) and ``liger`` (Liger-Kernel's
fused linear cross-entropy, when installed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CPU_SHAPES = [(2048, 2048, 32000), (2048, 2048, 128256)]
GPU_SHAPES = [(t, h, v) for t in (2048, 4096, 8192) for h in (2048, 4096) for v in (32000, 128256)]


def worker(method: str, tokens: int, hidden: int, vocab: int, device: str, head: str) -> dict:
    import torch
    import torch.nn.functional as F

    from ftl.kernels.fused_ce import linear_cross_entropy
    from ftl.training.flops import proc_status_gib

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype).mul_(0.02).requires_grad_(head == "trained")
    y = torch.randint(0, vocab, (tokens,), device=device)

    def naive(h, w, y):
        return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")

    if method == "naive":
        fn = naive
    elif method == "fused":
        backend = "triton" if device == "cuda" else "torch"
        fn = lambda h, w, y: linear_cross_entropy(h, w, y, backend=backend)  # noqa: E731
    elif method == "compiled":
        fn = torch.compile(naive)
    else:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        fn = lambda h, w, y: liger(w, h, y)  # noqa: E731  (Liger takes the weight first)

    def step():
        loss = fn(h, w, y)
        loss.backward()
        h.grad = None
        w.grad = None
        return loss

    if device == "cuda":
        step()  # warm-up (compilation, autotuning)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return {"peak_gib": peak, "ms": sorted(times)[2] * 1e3}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base = proc_status_gib("VmRSS")
    start = time.perf_counter()
    step()
    return {"peak_gib": proc_status_gib("VmHWM") - base, "ms": (time.perf_counter() - start) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", help="T,H,V;T,H,V... (default: a CPU or GPU grid)")
    parser.add_argument("--worker", nargs=6, metavar=("METHOD", "T", "H", "V", "DEVICE", "HEAD"))
    args = parser.parse_args()
    if args.worker:
        method, t, h, v, device, head = args.worker
        print("RESULT " + json.dumps(worker(method, int(t), int(h), int(v), device, head)))
        return
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes else (
        GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    methods = ["naive", "fused"] + (["compiled"] if args.device == "cuda" else [])
    try:
        import liger_kernel  # noqa: F401

        methods.append("liger")
    except ImportError:
        print("(Liger-Kernel is not installed: no liger column)")
    print(f"| lm_head | tokens | hidden | vocab | {' | '.join(methods)} (GiB{', ms' if args.device == 'cuda' else ''}) | fused / naive memory |")
    print("|---|---|---|---|" + "---|" * len(methods) + "---|")
    for (t, h, v), head in [(shape, head) for shape in shapes for head in ("frozen", "trained")]:
        results = {}
        for method in methods:
            out = subprocess.run([sys.executable, __file__, "--worker", method, str(t), str(h), str(v), args.device, head],
                                 capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            results[method] = json.loads(line[0][7:]) if line else None
        cells = []
        for method in methods:
            r = results[method]
            cells.append("failed" if r is None else f"{r['peak_gib']:.2f}" + (f", {r['ms']:.1f}" if args.device == "cuda" else ""))
        ratio = (f"{results['fused']['peak_gib'] / results['naive']['peak_gib']:.2f}x"
                 if results["fused"] and results["naive"] else "-")
        print(f"| {head} | {t} | {h} | {v} | {' | '.join(cells)} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
