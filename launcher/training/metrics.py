"""Run metrics: one JSON line per logging step in ``metrics.jsonl``, and what the user sees live.

On a terminal the user sees a rich progress bar (loss, lr, tokens/s, ETA); elsewhere (CI logs,
Slurm output files) one plain line per logging step, which is what those logs can show.
Records also go to TensorBoard and, when asked for, Weights & Biases; at the end of a run the
main process draws ``loss.png`` and prints a one-screen summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ftl.console import console
from ftl.checkpoints.rundir import RunDir

if TYPE_CHECKING:
    from ftl.training.trainer import RunSummary


log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl`` and mirrors them to TensorBoard / W&B (main process only).

    On resume, ``resume_step`` drops TensorBoard events after the checkpoint (``purge_step``): those
    steps run again, as ``metrics.jsonl`` is cut back to the checkpoint too.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, report_to: Sequence[str] = (), resume_step: int = 0,
                 config: dict[str, Any] | None = None, wandb_project: str = "ftl", run_name: str | None = None):
        run = RunDir(Path(run_dir))
        self.path = run.metrics
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run.tensorboard), purge_step=resume_step or None)
        if "wandb" in report_to:
            import wandb

            # The run directory's name is the run's identity: a resumed run continues the same W&B run.
            name = run_name or Path(run_dir).name
            self.wandb = wandb.init(project=wandb_project, name=name, id=_wandb_id(run_dir), resume="allow",
                                    dir=str(run_dir), config=config)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {(f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k}"): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_losses(records: list[dict[str, Any]], out: Path, title: str = "") -> None:
    """``loss.png``: the train loss raw (faint) and smoothed, eval loss as points, against step; a
    log-scale loss axis where the losses span more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train (raw)")
        ax.plot(steps, smoothed(list(losses)), color="tab:blue", label="train (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o", color="tab:orange", label="eval")
    positive = [v for _, v in train + evals if v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trainable token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def summary_table(records: list[dict[str, Any]], summary: RunSummary) -> Table:
    """The one-screen end-of-run summary, from the run's whole metrics history."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    rows: list[tuple[str, str]] = [("steps", f"{summary.steps} of {summary.total_steps}"),
                                   ("time", f"{summary.elapsed_s:.1f}s this session")]
    if train:
        n = max(1, min(10, len(train) // 10))  # a window of logged steps: one step's loss is noise
        first, last = (sum(r["loss"] for r in part) / n for part in (train[:n], train[-n:]))
        rows.append(("train loss", f"{first:.4f} -> {last:.4f}" + (f" (means of the first and last {n} logged steps)" if n > 1 else "")))
        if "reward_accuracy" in train[-1]:  # preference objectives
            tail = train[-n:]
            rows.append(("reward accuracy, margin", f"{sum(r['reward_accuracy'] for r in tail) / n:.1%}, "
                         f"{sum(r['reward_margin'] for r in tail) / n:.3f} (last {n} logged steps)"))
        rows.append(("tokens/s", f"{sum(r['tokens_per_s'] for r in train) / len(train):,.0f} (mean of logged steps, all devices)"))
        mfu = [r["mfu"] for r in train if "mfu" in r]
        rows.append(("model TFLOP/s per device", f"{sum(r['tflops_per_device'] for r in train) / len(train):.2f}"
                     + (f", MFU {sum(mfu) / len(mfu):.1%}" if mfu else "")))
        rows.append(("peak memory", f"{max(r['peak_memory_gib'] for r in train):.2f} GiB per device"))
    if evals:
        rows.append(("eval loss", f"{evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}"))
        for key in [k for k in evals[-1] if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss"]:
            first, last = evals[0].get(key), evals[-1][key]
            ratio = evals[-1].get(key.removesuffix("_loss") + "_vs_base")
            rows.append((f"eval {key[5:-5]} loss", (f"{first:.4f} -> " if first is not None else "") + f"{last:.4f}"
                         + (f" ({ratio:.3f}x the base model's)" if ratio is not None else "")))
    if summary.early_stopped:
        rows.append(("stopped early", f"at step {summary.steps}: train.early_stopping's patience ran out"))
    if summary.pruned:
        rows.append(("pruned", f"at step {summary.steps}: the sweep's pruner stopped this trial"))
    if summary.best_checkpoint:
        rows.append(("best checkpoint", f"{summary.best_checkpoint} ({summary.best_metric:.4f}; ftl export RUN --best)"))
    if summary.checkpoint:
        rows.append(("checkpoint", summary.checkpoint))
    table = Table(title="run summary", show_header=False, box=None, title_justify="left")
    for key, value in rows:
        table.add_row(key, value)
    return table


def clock(seconds: float) -> str:
    """H:MM:SS, as rich's time columns show it."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainingProgress:
    """Progress bar on a terminal, plain log lines otherwise; silent off the main process."""

    def __init__(self, total_steps: int, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self.start = time.perf_counter()
        self.live = enabled and console.is_terminal
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"),
                console=console,
            )
            # ftl's own ETA (metrics' eta_s): rich's estimate empties when logged steps are far apart.
            self.task = self.progress.add_task("train", total=total_steps, stats="", eta="-:--:--")
            self.progress.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        if "reward_accuracy" in record:  # pairwise objectives and reward models
            stats += f"  reward acc {record['reward_accuracy']:.0%}"
        if "reward_margin" in record:
            stats += f" margin {record['reward_margin']:.3f}"
        if "kl" in record:  # KTO's reference point
            stats += f"  kl {record['kl']:.3f}"
        if "mfu" in record:
            stats += f"  MFU {record['mfu']:.1%}"
        stats += f"  mem {record['peak_memory_gib']:.1f}GiB"
        eta = record.get("eta_s")
        if eta is None:
            eta = (time.perf_counter() - self.start) / max(step, 1) * (self.total - step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats, eta=clock(eta))
        else:
            console.print(f"step {step}/{self.total}  {stats}  eta {clock(eta)}")

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
