"""ftl against the peers users pick for SFT, side by side on this machine: TRL ``SFTTrainer``
(best-fit-decreasing packing, padding-free batches, completion-only loss) and HF ``Trainer`` + peft
(each micro-batch padded to its longest row).

    python -P benchmarks/peers.py [--models smollm2 qwen2-0.5b] [--steps 8] [--rounds 2] [--checkpointing] [--bf16]
        [--compile] [--kernels auto]

Models: the real SmolLM2-135M-Instruct (``make artifacts``), and a Qwen2-shaped ~0.5B config
(hidden 896, 24 layers, Qwen2.5's tokenizer and vocabulary) with random weights. Every run: LoRA
r=16 alpha 32 on all linear layers, fp32, AdamW, learning rate 2e-4 cosine without warmup, the
same alpaca rows tokenized once by ftl (prompt masked; TRL gets them pre-tokenized with their
completion mask, HF with the labels), max length 512, micro-batch 4, no accumulation, and
activation checkpointing on for all three or off for all three (``--checkpointing``; TRL's
``SFTConfig`` turns it on by default, which alone halves its peak memory and slows it down).
``--bf16``: bf16 autocast in all three (ftl ``train.mixed_precision: bf16``, ``bf16=True`` in the
others), which pays on CPUs with AVX-512 BF16 or AMX.

Each run is its own process (peak RSS is per process), in turn (ftl, trl, hf, ftl, ...), from
this one invocation. Throughput: real (non-pad) tokens per second between the ends of step 1
and the last step. Peak RSS: the process's VmHWM after training. Before the timed runs, each
trains one step on the same four rows of exactly 512 tokens (no padding, one row per pack): the
three step-1 losses must agree to numerical noise. (In the timed runs the packed and the padded
runs see different first batches, so their step-1 losses differ.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_hf import make_data, timed_hf_trainer  # noqa: E402

MICRO, MAX_LEN, LR = 4, 512, 2e-4
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)


def model_dir(work: Path, name: str) -> Path:
    """The benchmark model: SmolLM2 from the artifacts, or the random Qwen2-shaped one (written once)."""
    from ftl.artifacts import artifacts_dir

    if name == "smollm2":
        path = artifacts_dir() / "models" / "smollm2-135m-instruct"
        if not (path / "config.json").exists():
            sys.exit(f"{path}: missing; run `make artifacts` first")
        return path
    path = work / "qwen2-0.5b"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

        tokenizer = AutoTokenizer.from_pretrained(artifacts_dir() / "tokenizers" / "qwen2.5")
        config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **QWEN2_05B)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


CHECKPOINTING = BF16 = COMPILE = False  # set by --checkpointing, --bf16 (every worker alike) and --compile (ftl's)
KERNELS: str | list[str] = "auto"  # ftl's kernels (--kernels)
DATA = "data.jsonl"  # agree.jsonl for the agreement check


def make_agreement_data(path: Path) -> None:
    """MICRO rows each longer than MAX_LEN tokens, so every run's first (and only) batch is the
    same four rows of exactly MAX_LEN tokens: no padding, one row per pack, whatever the order."""
    import random

    from cpu_vs_hf import WORDS

    rng = random.Random(1)
    with open(path, "w") as f:
        for _ in range(MICRO):
            prompt = " ".join(rng.choice(WORDS) for _ in range(20))
            f.write(json.dumps({"instruction": prompt, "output": " ".join(rng.choice(WORDS) for _ in range(2 * MAX_LEN))}) + "\n")


def recipe(work: Path, model: Path, steps: int) -> dict:
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": {"path": str(work / DATA)}, "max_length": MAX_LEN, "packing": True},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "train": {"max_steps": steps, "micro_batch_size": MICRO, "gradient_accumulation_steps": 1, "learning_rate": LR,
                  "lr_scheduler": "cosine", "warmup_steps": 0, "mixed_precision": "bf16" if BF16 else "no", "logging_steps": 1, "seed": 0,
                  "resume": "never", "gradient_checkpointing": CHECKPOINTING, "compile": COMPILE},
        "output": {"dir": str(work / f"run-ftl-{model.name}"), "overwrite": True, "report_to": [], "keep_last": 1},
        "kernels": KERNELS,
    }


def tokenized_rows(work: Path, model: Path, steps: int):
    """The rows as ftl tokenizes them (alpaca template, prompt masked): the same tokens for all three."""
    from ftl.recipe.load import validate_recipe
    from ftl.data.sources import build_dataset
    from ftl.models.tokenizer import load_tokenizer

    cfg = validate_recipe(recipe(work, model, steps)).resolved()
    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, build_dataset(cfg.data.train, tokenizer, cfg.data, seed=0).select_columns(["input_ids", "labels"])


def lora_model(model: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))


def worker_ftl(work: Path, model: Path, steps: int) -> dict:
    from ftl.recipe.load import validate_recipe
    from ftl.checkpoints.rundir import read_metrics
    from ftl.train import train

    cfg = validate_recipe(recipe(work, model, steps)).resolved()
    train(cfg)
    records = [r for r in read_metrics(Path(cfg.output.dir) / "metrics.jsonl") if "loss" in r]
    tokens = sum(r["tokens_per_s"] * (r["elapsed_s"] - p["elapsed_s"]) for p, r in zip(records, records[1:]))
    return {"tokens_per_s": tokens / (records[-1]["elapsed_s"] - records[0]["elapsed_s"]), "step1_loss": records[0]["loss"],
            "tflops": sum(r["tflops_per_device"] for r in records[1:]) / max(len(records) - 1, 1)}


def matmul_roofline(model: Path, tokens: int, bf16: bool) -> float:
    """TFLOP/s of ``torch.mm`` alone on the model's projection and output shapes at the step's token
    count: what the step's matmuls could reach here, so ftl's model FLOP/s over it is the headroom."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv, i = heads * head_dim, (config.num_key_value_heads or heads) * head_dim, config.intermediate_size
    dtype = torch.bfloat16 if bf16 else torch.float32
    flops = seconds = 0.0
    for k, n in [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d), (d, config.vocab_size)]:
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        seconds += time.perf_counter() - start
        flops += 3 * 2 * tokens * k * n
    return flops / seconds / 1e12


def worker_trl(work: Path, model: Path, steps: int) -> dict:
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer, rows = tokenized_rows(work, model, steps)
    rows = rows.map(lambda r: {"completion_mask": [int(label != -100) for label in r["labels"]]}).remove_columns("labels")
    args = SFTConfig(
        output_dir=str(work / "run-trl"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=BF16, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        packing=True, max_length=MAX_LEN, completion_only_loss=True,
        gradient_checkpointing=CHECKPOINTING, gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    marks: list[tuple[float, int]] = []
    seen = {"tokens": 0}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), seen["tokens"]))

    trainer = SFTTrainer(model=lora_model(model), args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        # padding-free: one row of real tokens (attention_mask, when there is one, marks them)
        seen["tokens"] += int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    (t1, n1), (tn, nn) = marks[0], marks[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": (nn - n1) / (tn - t1), "step1_loss": losses[0]}


def worker_hf(work: Path, model: Path, steps: int) -> dict:
    from transformers import TrainingArguments

    tokenizer, rows = tokenized_rows(work, model, steps)
    args = TrainingArguments(
        output_dir=str(work / "run-hf"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=BF16, dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
        gradient_checkpointing=CHECKPOINTING, gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    timed = timed_hf_trainer(lora_model(model), tokenizer, rows, args)
    losses = [h["loss"] for h in timed["log_history"] if "loss" in h]
    return {"tokens_per_s": timed["tokens_per_s"], "step1_loss": losses[0], "real_fraction": timed["real_fraction"]}


WORKERS = {"ftl": worker_ftl, "trl": worker_trl, "hf": worker_hf}
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profiled(worker, work: Path, model: Path, steps: int) -> dict:
    """One worker's run under torch.profiler (CPU): the share of op time in matmuls and attention,
    and the ops that take the most (the whole run, model loading included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = worker(work, model, steps)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    share = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / total
    print(f"matmuls and attention: {share:.0%} of {total / 1e6:.1f} s of op time")
    return {**result, "matmul_share": share}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2-0.5b"], choices=["smollm2", "qwen2-0.5b"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/ftl-peers")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in all three")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in all three")
    parser.add_argument("--compile", action="store_true", help="ftl with train.compile (its first step, which compiles, is not timed)")
    parser.add_argument("--kernels", nargs="+", default=["auto"], help="ftl's kernels: auto, none, or a list")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--profile", action="store_true", help="with --worker: torch.profiler over the run, the ops taking the most time")
    parser.add_argument("--data", default="data.jsonl", help=argparse.SUPPRESS)  # the workers' rows
    args = parser.parse_args()
    global CHECKPOINTING, BF16, COMPILE, DATA, KERNELS
    CHECKPOINTING, BF16, COMPILE, DATA = args.checkpointing, args.bf16, args.compile, args.data
    KERNELS = args.kernels[0] if args.kernels[0] in ("auto", "none") else args.kernels
    work = Path(args.workdir)
    if args.worker:
        from ftl.training.flops import proc_status_gib

        if args.profile:
            result = profiled(WORKERS[args.worker], work, model_dir(work, args.models[0]), args.steps)
        else:
            result = WORKERS[args.worker](work, model_dir(work, args.models[0]), args.steps)
        print("RESULT " + json.dumps({**result, "peak_rss_mib": proc_status_gib("VmHWM") * 1024}))
        return

    work.mkdir(parents=True, exist_ok=True)
    make_data(work / "data.jsonl")
    make_agreement_data(work / "agree.jsonl")
    flags = ["--checkpointing"] * args.checkpointing + ["--bf16"] * args.bf16 + ["--compile"] * args.compile + ["--kernels", *args.kernels]

    def run(worker: str, name: str, steps: int, data: str) -> dict:
        out = subprocess.run([sys.executable, "-P", __file__, "--worker", worker, "--models", name, "--steps", str(steps),
                              "--workdir", str(work), "--data", data, *flags], capture_output=True, text=True)
        line = [text for text in out.stdout.splitlines() if text.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"{worker} on {name} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[0][7:])

    for name in args.models:
        model_dir(work, name)
        # Same model, same tokens: the first step's loss must agree before any speed is compared.
        first = {worker: run(worker, name, 2, "agree.jsonl")["step1_loss"] for worker in WORKERS}
        spread = (max(first.values()) - min(first.values())) / min(first.values())
        print(f"{name}: step-1 loss on the same {MICRO} x {MAX_LEN} tokens: "
              + ", ".join(f"{k} {v:.6f}" for k, v in first.items()) + f" (largest relative difference {spread:.1e})", flush=True)
        if not args.rounds:
            continue
        results: dict[str, list[dict]] = {worker: [] for worker in WORKERS}
        for _ in range(args.rounds):
            for worker in results:
                results[worker].append(run(worker, name, args.steps, "data.jsonl"))
                print(name, worker, results[worker][-1], flush=True)
        mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("tokens_per_s", "peak_rss_mib", "step1_loss")} for k, v in results.items()}
        print(f"\n{name}: {args.steps} steps x {args.rounds} rounds, micro-batch {MICRO} x {MAX_LEN} tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, "
              f"activation checkpointing {'on' if args.checkpointing else 'off'}{', ftl compiled' if args.compile else ''}\n"
              "| run | real tokens/s | peak RSS (MiB) | step-1 loss | tokens/s vs TRL | vs HF | RSS vs TRL |\n|---|---|---|---|---|---|---|")
        roofline = matmul_roofline(model_dir(work, name), MICRO * MAX_LEN, args.bf16)
        ftl_tflops = sum(r["tflops"] for r in results["ftl"]) / len(results["ftl"])
        print(f"ftl's model FLOP/s: {ftl_tflops * 1e3:.0f} GFLOP/s = {ftl_tflops / roofline:.0%} of torch.mm alone on the "
              f"step's shapes ({roofline * 1e3:.0f} GFLOP/s)")
        real = sum(r["real_fraction"] for r in results["hf"]) / len(results["hf"])
        print(f"HF computes {mean['hf']['tokens_per_s'] / real:.0f} tokens/s with its padding ({real:.0%} of them real)")
        for worker, m in mean.items():
            print(f"| {worker} | {m['tokens_per_s']:.0f} | {m['peak_rss_mib']:.0f} | {m['step1_loss']:.3f} | "
                  f"{m['tokens_per_s'] / mean['trl']['tokens_per_s']:.2f}x | {m['tokens_per_s'] / mean['hf']['tokens_per_s']:.2f}x | "
                  f"{m['peak_rss_mib'] / mean['trl']['peak_rss_mib']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
