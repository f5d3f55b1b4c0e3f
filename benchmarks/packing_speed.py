"""Training throughput with packing vs padding, on data with a realistic length spread (CPU).

    python benchmarks/packing_speed.py [--steps 12] [--workdir /tmp/ftl-packing-bench]

A Llama of ~6M parameters (hidden 256, 4 layers, byte-level BPE trained locally) and 2,000
completion examples whose lengths are long-tailed like instruction data (log-normal, median ~90
tokens, capped at 512). Both modes run the same model code and loss through ftl's data pipeline
(``ftl.data.preprocess``) with micro-batches of 8 rows: padding pads each micro-batch to its
longest example, packing fills rows of 512. Rounds alternate (padding, packing, ...) in one
process; the figure is real (non-pad) tokens per second, and the ratio is packing / padding.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from ftl.recipe.load import validate_recipe
from ftl.objectives.batch import pad_rows
from ftl.objectives.sft import causal_lm_loss_sum
from ftl.models.tokenizer import load_tokenizer
from ftl.data.preprocess import prepare
from ftl.tiny import write_tiny_model

WORDS = "the of and to in is was for on that with as by at from his her which are this be had not".split()


def make_data(path: Path, rows: int = 2000) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            n = min(400, max(4, int(rng.lognormvariate(4.2, 0.8))))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")


def run_round(model, optimizer, rows, pad_id: int, batch: int, steps: int, offset: int) -> tuple[int, float]:
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        chosen = [rows[(offset + step * batch + i) % len(rows)] for i in range(batch)]
        mb = pad_rows(chosen, pad_id)
        loss = causal_lm_loss_sum(model, mb) / max(1, int(mb.trainable_tokens()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(mb["token_mask" if "token_mask" in mb else "attention_mask"].sum())
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/ftl-packing-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        write_tiny_model(model_dir, "llama", hidden_size=256, layers=4, vocab_size=4096)
    make_data(work / "data.jsonl")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    results = {}
    for packing in (False, True):
        recipe = validate_recipe({
            "model": {"path": str(model_dir), "dtype": "float32"},
            "data": {"train": {"path": str(work / "data.jsonl"), "format": "completion"}, "max_length": 512, "packing": packing},
            "output": {"dir": str(work / "run")},
        }).resolved()
        tokenizer = load_tokenizer(recipe.model)
        rows, _, stats = prepare(recipe, tokenizer)
        results[packing] = {"rows": [rows[i] for i in range(len(rows))], "stats": stats, "tokens": 0, "seconds": 0.0}
    print(f"examples: {results[False]['stats']['examples']}, length p50 {results[False]['stats']['length']['p50']}, "
          f"p99 {results[False]['stats']['length']['p99']}; packing efficiency {results[True]['stats']['packing_efficiency']:.3f}")
    pad = tokenizer.pad_token_id
    run_round(model, optimizer, results[False]["rows"], pad, 8, 2, 0)  # warm-up
    for r in range(args.rounds):
        for packing in (False, True):
            tokens, seconds = run_round(model, optimizer, results[packing]["rows"], pad, 8, args.steps, r * args.steps * 8)
            results[packing]["tokens"] += tokens
            results[packing]["seconds"] += seconds
    speed = {k: v["tokens"] / v["seconds"] for k, v in results.items()}
    print("| mode | real tokens/s |\n|---|---|")
    print(f"| padding | {speed[False]:.0f} |\n| packing | {speed[True]:.0f} |")
    print(f"packing / padding: {speed[True] / speed[False]:.2f}x")


if __name__ == "__main__":
    main()
