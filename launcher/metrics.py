"""Run metrics: one JSON line per logging step in ``metrics.jsonl``, and what the user sees live.

On a terminal the user sees a rich progress bar (loss, lr, tokens/s, ETA); elsewhere (CI logs,
Slurm output files) one plain line per logging step, which is what those logs can show.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from launcher.console import console


class MetricsWriter:
    """Appends JSON records to ``metrics.jsonl`` (main process only), flushed per line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.progress.add_task("train", total=total_steps, stats="")
            self.progress.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        if "mfu" in record:
            stats += f"  MFU {record['mfu']:.1%}"
        stats += f"  mem {record['peak_memory_gib']:.1f}GiB"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
        else:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step, 1) * (self.total - step)
            console.print(f"step {step}/{self.total}  {stats}  eta {eta:.0f}s")

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
