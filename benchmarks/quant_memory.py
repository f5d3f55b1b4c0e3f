"""Weight memory of a base model in bf16 vs 4-bit NF4/FP4 (± double quant) vs 8-bit, as ftl loads it.

Builds a Llama config of about 200M parameters with random weights (saved once in bf16), then
loads it in each mode in a fresh child process, through the same code path as training
(``ftl.models.build.load_base_model``), and reports:

- weight bytes: parameters + buffers + bitsandbytes quantization state (absmax, codebooks),
- bits per parameter of the quantized linear layers (their storage plus their quantization state),
- the child's resident memory growth from before to after loading, and its peak RSS.

Embeddings stay in bf16 and ``lm_head`` is kept in full precision (ftl's default ``skip_modules``),
so the whole-model ratio is smaller than the linear layers' ratio.

Usage: python benchmarks/quant_memory.py [--hidden 1024 --layers 16]
Expected (QLoRA paper): NF4 about 4x smaller than bf16 for the linear layers; double quant saves
about 0.37 bits per parameter (block scales 32/64 bits -> 8/64 + 32/(64*256) bits).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "bf16": {"bits": None},
    "int8": {"bits": 8},
    "fp4": {"bits": 4, "quant_type": "fp4", "double_quant": False},
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": False},
    "nf4+dq": {"bits": 4, "quant_type": "nf4", "double_quant": True},
}


def build_model(out: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return model.num_parameters()


def _quant_state_bytes(state) -> int:
    if state is None:
        return 0
    total = 0
    for name in ("absmax", "code", "offset"):
        tensor = getattr(state, name, None)
        if tensor is not None and hasattr(tensor, "numel"):
            total += tensor.numel() * tensor.element_size()
    if getattr(state, "nested", False):
        total += _quant_state_bytes(state.state2)
    return total


def measure(model_dir: str, mode: str) -> dict:
    """Runs in the child: load in ``mode`` and measure."""
    import bitsandbytes as bnb
    import torch  # noqa: F401  (imported before the baseline so it is not counted)

    from ftl.recipe.schema import ModelSection, QuantizationSection
    from ftl.training.flops import proc_status_gib
    from ftl.models.build import load_base_model

    rss_before = proc_status_gib("VmRSS") * 2**30
    quant = QuantizationSection(compute_dtype="bfloat16", **MODES[mode])
    model = load_base_model(ModelSection(path=model_dir, dtype="bfloat16"), quant=quant)
    gc.collect()
    rss_after = proc_status_gib("VmRSS") * 2**30
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    linear_params, linear_bytes = 0, 0
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, torch.nn.Linear)) and module is not model.lm_head:
            weight = module.weight
            linear_params += module.in_features * module.out_features
            linear_bytes += weight.numel() * weight.element_size()
            state_bytes = _quant_state_bytes(getattr(weight, "quant_state", None))
            scb = getattr(weight, "SCB", None)  # 8-bit row scales
            state_bytes += scb.numel() * scb.element_size() if scb is not None else 0
            linear_bytes += state_bytes
            weight_bytes += state_bytes
    return {
        "mode": mode,
        "weight_bytes": weight_bytes,
        "linear_bytes": linear_bytes,
        "linear_bits_per_param": 8 * linear_bytes / linear_params,
        "rss_growth": rss_after - rss_before,
        "peak_rss": rss_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp), args.hidden, args.layers)
        rows = []
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", tmp, mode], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    base = rows[0]
    print(f"Llama config, hidden {args.hidden}, {args.layers} layers: {n_params / 1e6:.0f}M parameters")
    print(
        "| mode | all weights | vs bf16 | linear layers | vs bf16 | bits/param (linear) "
        "| RSS growth after load | process peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for r in rows:
        print(
            f"| {r['mode']} | {r['weight_bytes'] / mib:.0f} MiB | {base['weight_bytes'] / r['weight_bytes']:.2f}x"
            f" | {r['linear_bytes'] / mib:.0f} MiB | {base['linear_bytes'] / r['linear_bytes']:.2f}x"
            f" | {r['linear_bits_per_param']:.3f} | {r['rss_growth'] / mib:.0f} MiB | {r['peak_rss'] / mib:.0f} MiB |"
        )
    by_mode = {r["mode"]: r for r in rows}
    saved = by_mode["nf4"]["linear_bits_per_param"] - by_mode["nf4+dq"]["linear_bits_per_param"]
    print(f"double quant saves {saved:.3f} bits/parameter (paper: ~0.37)")


if __name__ == "__main__":
    main()
