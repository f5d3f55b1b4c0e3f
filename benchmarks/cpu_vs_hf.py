"""The same LoRA fine-tune through ftl and through HF ``Trainer`` + peft, on CPU.

    python benchmarks/cpu_vs_hf.py [--steps 10] [--rounds 2] [--workdir /tmp/ftl-vs-hf]

A Llama config of ~27M parameters (hidden 512, 8 layers, random weights, BPE tokenizer trained
locally) and 1,500 alpaca rows whose lengths are long-tailed like instruction data (log-normal,
median ~70 tokens, capped at 512). Both sides use the same tokenized rows (prompt masked), LoRA
r=16 on all linear layers, fp32, AdamW, micro-batch 4 x accumulation 4 rows per step, cosine LR.
HF pads each micro-batch to its longest row (``DataCollatorForSeq2Seq``), as its examples do;
ftl runs the recipe three times: as configured by default (padding), with ``data.packing: true``,
and with packing plus ``kernels: auto`` (on CPU: the fused cross-entropy; the Triton kernels need CUDA).

Every run is its own process (peak RSS is per process), started in turn (hf, ftl, ftl-packed,
hf, ...) from this one invocation. Throughput is real (non-pad) tokens per second between the
end of step 1 and the last step; peak RSS is the process's VmHWM after training.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his her which are this be had not "
         "model data train loss token batch layer weight answer question result value list number").split()
MICRO, ACCUM, MAX_LEN = 4, 4, 512


def make_data(path: Path, rows: int = 1500) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            n = min(480, max(4, int(rng.lognormvariate(3.9, 0.9))))
            f.write(json.dumps({"instruction": prompt, "output": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")


def recipe(work: Path, steps: int, packing: bool, kernels: str = "none") -> dict:
    return {
        "kernels": kernels,
        "model": {"path": str(work / "model"), "dtype": "float32"},
        "data": {"train": {"path": str(work / "data.jsonl")}, "max_length": MAX_LEN, "packing": packing},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "train": {"max_steps": steps, "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
                  "learning_rate": 2e-4, "logging_steps": 1, "seed": 0, "resume": "never"},
        "output": {"dir": str(work / f"run-{'packed' if packing else 'padded'}-{kernels}"), "overwrite": True,
                   "report_to": [], "keep_last": 1},
    }


def worker_ftl(work: Path, steps: int, packing: bool, kernels: str = "none") -> dict:
    from ftl.recipe.load import validate_recipe
    from ftl.checkpoints.rundir import read_metrics
    from ftl.train import train

    cfg = validate_recipe(recipe(work, steps, packing, kernels)).resolved()
    train(cfg)
    records = [r for r in read_metrics(Path(cfg.output.dir) / "metrics.jsonl") if "loss" in r]
    # Tokens of steps 2..N over the time between the ends of step 1 and step N.
    tokens = sum(r["tokens_per_s"] * (r["elapsed_s"] - p["elapsed_s"]) for p, r in zip(records, records[1:]))
    return {"tokens_per_s": tokens / (records[-1]["elapsed_s"] - records[0]["elapsed_s"]), "final_loss": records[-1]["loss"]}


def timed_hf_trainer(model, tokenizer, rows, args) -> dict:
    """Train with HF ``Trainer``, each micro-batch padded to its longest row; returns real (non-pad)
    tokens/s and real tokens per row between the ends of step 1 and the last step, and the result."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    seen = {"tokens": 0, "rows": 0, "padded": 0}

    def collate(features):
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        seen["rows"] += batch["input_ids"].shape[0]
        seen["padded"] += batch["input_ids"].numel()
        return batch

    marks: list[tuple[float, int, int, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), seen["tokens"], seen["rows"], seen["padded"]))

    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    result = trainer.train()
    (t1, n1, r1, p1), (tn, nn, rn, pn) = marks[0], marks[-1]
    return {"tokens_per_s": (nn - n1) / (tn - t1), "tokens_per_row": (nn - n1) / max(rn - r1, 1), "result": result,
            "real_fraction": (nn - n1) / max(pn - p1, 1),  # of the tokens computed, the non-pad ones
            "log_history": trainer.state.log_history}


def worker_hf(work: Path, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from ftl.recipe.load import validate_recipe
    from ftl.data.sources import build_dataset
    from ftl.models.tokenizer import load_tokenizer

    cfg = validate_recipe(recipe(work, steps, False)).resolved()
    tokenizer = load_tokenizer(cfg.model)
    rows = build_dataset(cfg.data.train, tokenizer, cfg.data, seed=0).select_columns(["input_ids", "labels"])
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(work / "run-hf"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True,
    )
    timed = timed_hf_trainer(model, tokenizer, rows, args)
    return {"tokens_per_s": timed["tokens_per_s"], "final_loss": timed["result"].training_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/ftl-vs-hf")
    parser.add_argument("--worker", choices=["hf", "ftl", "ftl-packed", "ftl-packed-kernels"])
    args = parser.parse_args()
    work = Path(args.workdir)
    if args.worker:
        if args.worker == "hf":
            result = worker_hf(work, args.steps)
        else:
            result = worker_ftl(work, args.steps, packing=args.worker != "ftl",
                                kernels="auto" if args.worker.endswith("kernels") else "none")
        from ftl.training.flops import proc_status_gib

        print("RESULT " + json.dumps({**result, "peak_rss_mib": proc_status_gib("VmHWM") * 1024}))
        return

    from ftl.tiny import write_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    make_data(work / "data.jsonl")
    if not (work / "model" / "config.json").exists():
        corpus = [line for line in (work / "data.jsonl").read_text().splitlines()]
        write_tiny_model(work / "model", "llama", hidden_size=512, layers=8, vocab_size=8192, corpus=corpus)
    results: dict[str, list[dict]] = {"hf": [], "ftl": [], "ftl-packed": [], "ftl-packed-kernels": []}
    for _ in range(args.rounds):
        for name in results:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--workdir", str(work)],
                                 capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(line[0][7:]))
            print(name, results[name][-1], flush=True)
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("tokens_per_s", "peak_rss_mib")} for k, v in results.items()}
    hf = mean["hf"]
    print("\n| run | real tokens/s | peak RSS (MiB) | tokens/s vs HF | peak RSS vs HF |\n|---|---|---|---|---|")
    for name, m in mean.items():
        print(f"| {name} | {m['tokens_per_s']:.0f} | {m['peak_rss_mib']:.0f} | {m['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
              f"| {m['peak_rss_mib'] / hf['peak_rss_mib']:.2f}x |")


if __name__ == "__main__":
    main()
