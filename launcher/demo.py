"""``ftl demo``: the whole product on CPU in a few minutes.

Builds a tiny random Llama and the word-category task, measures held-out exact match, trains the
demo recipe with LoRA, and measures again. The demo fails (exit 1) unless accuracy improved.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

from rich.table import Table

from ftl.config import load_recipe, with_values
from ftl.console import console
from ftl.demo_data import write_demo_data
from ftl.evaluate import evaluate_path
from ftl.tiny import write_tiny_model
from ftl.train import train


def run_demo(recipe_path: str | Path, workdir: Path) -> dict[str, Any]:
    model_dir, data_dir = workdir / "tiny-llama", workdir / "data"
    train_path, eval_path = write_demo_data(data_dir)
    recipe = with_values(load_recipe(recipe_path), {
        "model.path": str(model_dir), "data.train.0.path": str(train_path), "data.eval.0.path": str(eval_path),
        "output.dir": str(workdir / "run"),
        "train.resume": "never", "output.overwrite": True,  # the demo's own run directory, rebuilt each time
    })

    console.rule("1. tiny model and data")
    write_tiny_model(model_dir, "llama")
    console.print(f"model {model_dir}, data {train_path} ({_rows(train_path)} rows) and {eval_path} ({_rows(eval_path)} held out)")

    console.rule("2. held-out exact match before training")
    before, n, _ = evaluate_path(model_dir, recipe.data.eval[0])
    console.print(f"exact match before: {before:.1%} of {n}")

    console.rule("3. LoRA training")
    summary = train(recipe)

    console.rule("4. held-out exact match after training")
    after, n, examples = evaluate_path(summary.checkpoint, recipe.data.eval[0])
    for example in examples:
        console.print(f"  expected {example['expected']!r:<10} generated {example['generated']!r}")

    table = Table(title="demo result")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", f"{summary.initial_eval_loss:.4f}", f"{summary.final_eval_loss:.4f}")
    table.add_row(f"held-out exact match ({n} rows)", f"{before:.1%}", f"{after:.1%}")
    console.print(table)
    console.print(f"run directory: {recipe.output.dir} (metrics.jsonl, checkpoints/)")
    return {**dataclasses.asdict(summary), "accuracy_before": before, "accuracy_after": after}


def _rows(path: Path) -> int:
    return sum(1 for _ in open(path))
