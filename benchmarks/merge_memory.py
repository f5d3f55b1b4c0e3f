"""Peak memory of merging a LoRA adapter: ftl's shard-by-shard merge vs load + merge_and_unload.

Builds a random Llama of about 1.2 GB in bf16 (hidden 2048, 10 layers, 32k vocabulary), saved in
5 shards, and a LoRA adapter (r=16, all linear layers, random B so that every delta is non-zero),
then runs each merge in a fresh process and reports its peak RSS against the largest shard:

    python benchmarks/merge_memory.py [--workdir /tmp/merge-bench]

- ``stream``: ``ftl.export.merge.write_merged`` (what ``ftl export`` runs for LoRA checkpoints)
- ``peft``: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
  ``save_pretrained``, the usual recipe.

Both write bf16 shards of the same size, and the script checks that they hold the same tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHARD = "300MB"


def build(workdir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = workdir / "base"
    if (base / "config.json").exists():
        return
    config = LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=10, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size=SHARD)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    peft_model.save_pretrained(workdir / "adapter")


def run(mode: str, workdir: Path) -> dict:
    import torch

    out = workdir / f"out-{mode}"
    out.mkdir(exist_ok=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftl.training.flops import proc_status_gib
    from ftl.export.merge import Adapter, Merge, TensorSource, write_merged

    baseline = proc_status_gib("VmRSS") * 1024  # the interpreter with torch, transformers and peft imported
    start = time.perf_counter()
    if mode == "stream":
        write_merged(Merge(TensorSource.from_dir(workdir / "base"), Adapter.load(workdir / "adapter")), out, torch.bfloat16, SHARD)
    else:
        model = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, workdir / "adapter").merge_and_unload()
        merged.save_pretrained(out, max_shard_size=SHARD)
    peak = proc_status_gib("VmHWM") * 1024
    return {"mode": mode, "peak_rss_mib": peak, "growth_mib": peak - baseline, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/ftl-merge-bench")
    parser.add_argument("--mode", choices=["stream", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.mode:
        print(json.dumps(run(args.mode, workdir)))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    build(workdir)
    shards = sorted((workdir / "base").glob("model-*.safetensors"))
    total = sum(s.stat().st_size for s in shards) / 2**20
    largest = max(s.stat().st_size for s in shards) / 2**20
    print(f"base model: {total:.0f} MiB in {len(shards)} shards, largest {largest:.0f} MiB")
    results = []
    for mode in ("stream", "peft"):
        line = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--mode", mode],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
    check_same(workdir)
    print("| merge | peak RSS | growth over imports | growth / largest shard | seconds |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['peak_rss_mib']:.0f} MiB | {r['growth_mib']:.0f} MiB | {r['growth_mib'] / largest:.2f}x | {r['seconds']:.1f} |")


def check_same(workdir: Path) -> None:
    """Both merges wrote the same weights (bf16, up to one rounding step)."""
    from safetensors import safe_open

    def weight_map(directory: Path) -> dict:
        return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]

    a, b = weight_map(workdir / "out-stream"), weight_map(workdir / "out-peft")
    assert set(a) == set(b), "different tensor names"
    worst = 0.0
    for name in a:
        with safe_open(str(workdir / "out-stream" / a[name]), "pt") as fa, safe_open(str(workdir / "out-peft" / b[name]), "pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
            worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item())
    print(f"same tensors in both outputs; largest difference {worst:.2e} of each tensor's max")
    assert worst < 1e-2


if __name__ == "__main__":
    main()
