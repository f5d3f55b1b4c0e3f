"""Full fine-tuning and QLoRA of a ~1B Llama config on one GPU: ftl vs HF Trainer (+ peft + bitsandbytes).

    python benchmarks/gpu.py [--steps 20] [--workdir /tmp/ftl-gpu]
    python benchmarks/gpu.py --smoke      # the same code paths on CPU with a tiny model (checks the script)

Model: Llama config with hidden 2048, 16 layers, MLP 5632, 32 heads (4 KV heads), vocabulary
32,000 (1.1B parameters, TinyLlama's shape), random bf16 weights. Data: alpaca rows from
``cpu_vs_hf.make_data``; ftl packs them into rows of 2048 tokens, HF pads each micro-batch.
Both: bf16, gradient checkpointing, micro-batch 4 x accumulation 2, AdamW (full) or paged 8-bit
AdamW on an NF4 + double-quant base with LoRA r=16 on all linear layers (QLoRA); ftl adds
``kernels: auto``. Each run is its own process; tokens/s is real (non-pad) tokens per second after
the first step, MFU uses ftl.training.flops (the same count for both), peak memory is
``torch.cuda.max_memory_allocated``, and for ftl the plan's estimate is printed next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, also under PYTHONSAFEPATH
from cpu_vs_hf import make_data, timed_hf_trainer  # noqa: E402

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
MICRO, ACCUM = 4, 2


def write_model(out: Path, smoke: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftl.tiny import build_tokenizer

    rows = [json.loads(line) for line in (out.parent / "data.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer([r["instruction"] + " " + r["output"] for r in rows], vocab_size=4096)
    config = LlamaConfig(vocab_size=512 if smoke else 32000, max_position_embeddings=4096, **(SMOKE if smoke else SHAPE),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if smoke else torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def recipe(work: Path, method: str, steps: int, smoke: bool) -> dict:
    qlora = method == "qlora"
    return {
        "model": {"path": str(work / "model"), "dtype": "float32" if smoke else "bfloat16"},
        "data": {"train": {"path": str(work / "data.jsonl")}, "max_length": 256 if smoke else 2048, "packing": True},
        "method": {"type": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "quantization": {"compute_dtype": "float32" if smoke else "bfloat16"} if qlora else {},
        "train": {"max_steps": steps, "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM, "logging_steps": 1,
                  "learning_rate": 2e-4 if qlora else 2e-5, "gradient_checkpointing": True, "seed": 0, "resume": "never",
                  "mixed_precision": "no" if smoke else "bf16", "optimizer": "paged_adamw_8bit" if qlora else "adamw_torch"},
        "kernels": "auto",
        "output": {"dir": str(work / f"run-ftl-{method}"), "overwrite": True, "report_to": [], "keep_last": 1},
    }


def worker_ftl(work: Path, method: str, steps: int, smoke: bool) -> dict:
    from ftl.recipe.load import validate_recipe
    from ftl.training.flops import peak_memory_gib
    from ftl.planning.memory import estimate, model_shape
    from ftl.checkpoints.rundir import read_metrics
    from ftl.train import train

    cfg = validate_recipe(recipe(work, method, steps, smoke)).resolved()
    train(cfg)
    records = [r for r in read_metrics(Path(cfg.output.dir) / "metrics.jsonl") if "loss" in r][1:]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
            "mfu": sum(r.get("mfu", 0.0) for r in records) / len(records), "peak_gib": peak_memory_gib(),
            "estimate_gib": estimate(cfg, model_shape(cfg.model.path)).allocated}


def worker_hf(work: Path, method: str, steps: int, smoke: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

    from ftl.recipe.load import validate_recipe
    from ftl.data.sources import build_dataset
    from ftl.training.flops import flops_counter, peak_flops, peak_memory_gib
    from ftl.models.tokenizer import load_tokenizer

    cfg = validate_recipe({**recipe(work, method, steps, smoke), "data": {"train": {"path": str(work / "data.jsonl")},
                                                                         "max_length": 256 if smoke else 2048}}).resolved()
    tokenizer = load_tokenizer(cfg.model)
    rows = build_dataset(cfg.data.train, tokenizer, cfg.data, seed=0).select_columns(["input_ids", "labels"])
    dtype = torch.float32 if smoke else torch.bfloat16
    extra = {}
    if method == "qlora":
        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype, **extra)
    if method == "qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(work / f"run-hf-{method}"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=steps, learning_rate=cfg.train.learning_rate, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
        report_to=[], bf16=not smoke, gradient_checkpointing=True, use_cpu=smoke, remove_unused_columns=False, seed=0,
        optim="paged_adamw_8bit" if method == "qlora" else "adamw_torch", disable_tqdm=True,
    )
    timed = timed_hf_trainer(model, tokenizer, rows, args)
    tokens_per_s = timed["tokens_per_s"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flops = flops_counter(base)(timed["tokens_per_row"])
    peak = peak_flops()
    return {"tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / peak if peak else 0.0, "peak_gib": peak_memory_gib()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default="/tmp/ftl-gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, 3 steps: checks the script, measures nothing")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "METHOD"))
    args = parser.parse_args()
    work = Path(args.workdir)
    steps = 3 if args.smoke else args.steps
    if args.worker:
        tool, method = args.worker
        result = (worker_ftl if tool == "ftl" else worker_hf)(work, method, steps, args.smoke)
        print("RESULT " + json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    make_data(work / "data.jsonl", rows=400 if args.smoke else 4000)
    if not (work / "model" / "config.json").exists():
        write_model(work / "model", args.smoke)
    print("| method | tool | real tokens/s | MFU | peak GiB | plan estimate GiB | tokens/s vs HF |\n|---|---|---|---|---|---|---|")
    for method in ("full", "qlora"):
        results = {}
        for tool in ("hf", "ftl"):
            cmd = [sys.executable, __file__, "--worker", tool, method, "--workdir", str(work)] + (["--smoke"] if args.smoke else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{tool} {method} failed:\n{out.stderr[-3000:]}")
            results[tool] = r = json.loads(line[0][7:])
            estimate = f"{r['estimate_gib']:.1f}" if "estimate_gib" in r else "-"
            print(f"| {method} | {tool} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | {estimate} | "
                  f"{r['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
