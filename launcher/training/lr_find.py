"""``ftl lr-find RECIPE``: the learning-rate range test, before a run rather than instead of one.

The learning rate decides a fine-tune more than any other setting, and a wrong one shows only
after the run. The range test (Smith, 2015; fastai's and Lightning's LR finder) trains the
recipe's own model on its own batches for a short sweep in which the rate grows geometrically
from ``start`` to ``end`` each step, and records the loss; it stops once the smoothed loss has
grown to ``diverge`` times its minimum (or is not finite). The suggestion is Lightning's: the rate
where the smoothed loss falls fastest against log(rate), skipping the first tenth of the sweep and
its last step. It runs in one process, in a directory of its own (``<output.dir>-lr-find``): no
checkpoint is written and nothing of the recipe's run directory changes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ftl.checkpoints.rundir import write_atomic
from ftl.console import console
from ftl.distributed.preflight import writer_lock
from ftl.errors import UserError
from ftl.recipe.load import with_values
from ftl.recipe.schema import Recipe
from ftl.training.metrics import smoothed
from ftl.training.trainer import Trainer

MARKER = ".ftl-lr-find"  # in an lr-find directory: a later lr-find may replace what is in it


@dataclass
class LrFind:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    stopped: str | None  # why the sweep ended before its last step


def out_dir_for(recipe: Recipe) -> Path:
    root = Path(recipe.output.dir)
    return root.with_name(root.name + "-lr-find")


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The rate where the (already smoothed) loss falls fastest against log(rate), skipping the
    first tenth of the sweep and its last step (as Lightning's ``suggestion()``)."""
    begin, end = max(1, len(lrs) // 10), len(lrs) - 1
    if end - begin < 2:
        return None
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(begin, end)]
    return lrs[begin + min(range(len(slopes)), key=slopes.__getitem__)]


def lr_find(recipe: Recipe, out: Path, start: float = 1e-7, end: float = 1.0, steps: int = 100, diverge: float = 4.0) -> LrFind:
    if not 0 < start < end:
        raise UserError(f"--start {start:g} --end {end:g}: the sweep needs 0 < start < end")
    if steps < 5:
        raise UserError(f"--steps {steps}: a sweep of fewer than 5 steps says nothing; use e.g. 100")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(f"--out: {out} exists and is not an earlier lr-find's directory; choose a new one")
    sweep = with_values(recipe, {
        "output.dir": str(out), "output.overwrite": True, "output.report_to": [], "output.keep_last": None,
        "train.max_steps": steps, "train.learning_rate": start, "train.lr_scheduler": "constant", "train.warmup_steps": 0,
        "train.eval_steps": None, "train.save_steps": None, "train.save_minutes": None, "train.resume": "never",
        "train.early_stopping": None, "data.eval": None, "data.eval_fraction": None,
        "distributed.strategy": "auto", "distributed.num_processes": 1, "distributed.num_machines": 1,
        "slurm.nodes": 1, "slurm.gpus_per_node": None,
    })
    if recipe.world_size > 1:
        console.print(f"lr-find runs in this one process (the recipe trains on {recipe.world_size})", highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("ftl lr-find directory: `ftl lr-find` replaces what is here\n")
    ratio = (end / start) ** (1 / (steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    stopped = None
    with writer_lock(sweep):
        trainer = Trainer(sweep)
        try:
            for k in range(steps):
                lr = start * ratio**k
                for group in trainer.optimizer.param_groups:  # the constant schedule puts `start` back after each step
                    group["lr"] = lr
                result = trainer.step(trainer.next_micro_batches())
                if not result.taken:
                    stopped = f"the loss or gradient norm was not finite at {lr:.3g}"
                    break
                lrs.append(lr)
                losses.append(result.loss)
                trend = smoothed(losses, 0.9)
                if trend[-1] > diverge * min(trend):
                    stopped = f"the smoothed loss passed {diverge:g}x its minimum at {lr:.3g}"
                    break
        finally:
            trainer.progress.close()
            trainer.metrics.close()
            trainer.accelerator.end_training()
    trend = smoothed(losses, 0.9)
    result = LrFind(lrs, losses, trend, suggest(lrs, trend), stopped)
    write_atomic(out / "lr_find.json", json.dumps(asdict(result), indent=1))
    _plot(result, out / "lr_find.png")
    return result


def _plot(result: LrFind, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", label="smoothed")
    if result.suggestion:
        ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggestion {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
