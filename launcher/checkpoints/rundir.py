"""The run directory: every path in it is named here, every file ftl writes there is written
atomically, and nothing in it is deleted unless the recipe says so.

Layout (see the README's "Where outputs go")::

    run.yaml  metrics.jsonl  data_stats.json  loss.png  STOPPED
    checkpoints/step-N/ checkpoints/latest checkpoints/best   tensorboard/   data/   launch/   slurm/   export/
    set-aside/<time>/    what ftl moved out of its way instead of deleting it

A run directory may hold an earlier run, files a user put there, or damage; :meth:`RunDir.prepare`
makes it ready for this run only after model, tokenizer and data have been checked, and moves
aside whatever it cannot use. The resolved recipe is ``run.yaml``, not ``recipe.yaml``: users keep
their own recipe in the run directory (``ftl train runs/x/recipe.yaml`` with ``output.dir:
runs/x``), and ftl never writes over it. (Runs made by earlier versions read theirs from
``recipe.yaml``.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ftl.errors import UserError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")


def step_of(path: Path | str) -> int:
    """N of a ``step-N`` name (a checkpoint directory or the text of ``latest``); -1 for anything else."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else -1


class RunDirError(UserError):
    """The run directory cannot be used as asked."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        """The resolved recipe this run trained with, written by ftl."""
        return self.root / "run.yaml"

    @property
    def recipe_to_read(self) -> Path:
        """The run's resolved recipe: ``run.yaml``, or ``recipe.yaml`` of a run made by an earlier version."""
        legacy = self.root / "recipe.yaml"
        return legacy if not self.recipe.is_file() and legacy.is_file() and self.checkpoints.is_dir() else self.recipe

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def stopped(self) -> Path:
        """Present after a graceful stop: why, at which step, which checkpoint (the Slurm script requeues on it)."""
        return self.root / "STOPPED"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        """Name of the newest complete checkpoint, replaced atomically after it is complete."""
        return self.checkpoints / "latest"

    @property
    def best(self) -> Path:
        """Name of the best checkpoint by ``train.early_stopping``'s metric (never pruned)."""
        return self.checkpoints / "best"

    def best_checkpoint(self) -> Path | None:
        """The checkpoint ``best`` names, if it names one that is there."""
        if not self.best.is_file():
            return None
        path = self.checkpoints / self.best.read_text().strip()
        return path if STEP_DIR.match(path.name) and path.is_dir() else None

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def data_cache(self) -> Path:
        return self.root / "data"

    @property
    def launch(self) -> Path:
        return self.root / "launch"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def step_dirs(self) -> list[Path]:
        """Checkpoint directories (complete or not; see ftl.checkpoints.checkpoint.verify)."""
        if not self.checkpoints.is_dir():
            return []
        return [p for p in self.checkpoints.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir | None:
        """The run directory a checkpoint lies in (``<run>/checkpoints/step-N``), if it lies in one."""
        checkpoint = Path(checkpoint).resolve()
        if STEP_DIR.match(checkpoint.name) and checkpoint.parent.name == "checkpoints":
            run = cls(checkpoint.parent.parent)
            if run.recipe_to_read.is_file():
                return run
        return None

    # ------------------------------------------------------------------------- writing

    def write(self, path: Path, text: str) -> None:
        write_atomic(path, text)

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the one process that writes this run directory; says which one."""
        return self.root / ".ftl-lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per run directory: a second ``ftl train`` on it is refused in one line instead of
        setting aside the first's live checkpoints. The kernel releases the lock when its process
        dies however it dies (kill -9 included), so a lock file left behind is never stale."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file in the way, a name too long, no permission
            raise RunDirError(f"output.dir: cannot use {self.root} as a run directory: {err.strerror}") from None
        if self.lock_file.is_symlink() or (self.lock_file.exists() and not self.lock_file.is_file()):
            log.warning("moved %s to %s: ftl keeps its lock there", self.lock_file.name, self.move_aside([self.lock_file]))
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise RunDirError(f"output.dir: cannot create {self.lock_file}: {err.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise RunDirError(f"output.dir: {self.root} is in use by another ftl run ({holder}); wait for it to "
                                  "finish or stop it, or choose another output.dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock; the file stays (removing it would race a next writer)

    def write_data_stats(self, stats: dict) -> None:
        """``data_stats.json``; a file of that name that is not ftl's is moved aside first."""
        if self.data_stats.exists() and not _is_data_stats(self.data_stats):
            log.warning("moved %s to %s: ftl writes its data statistics there", self.data_stats.name,
                        self.move_aside([self.data_stats]))
        write_atomic(self.data_stats, json.dumps(stats, indent=2))

    def write_stopped(self, reason: str, step: int, checkpoint: str) -> None:
        write_atomic(self.stopped, json.dumps({"reason": reason, "step": step, "checkpoint": checkpoint}))

    def move_aside(self, paths: list[Path]) -> Path | None:
        """Move what cannot be used out of the way, never deleting it: into ``set-aside/<time>/``
        under its own name, where a user can inspect or delete it."""
        present = [p for p in paths if p.exists() or p.is_symlink()]
        if not present:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = self.root / "set-aside" / stamp, 1
        while target.exists():
            n += 1
            target = self.root / "set-aside" / f"{stamp}-{n}"
        target.mkdir(parents=True)
        for path in present:
            os.replace(path, target / path.name)
        return target

    def prepare(self, recipe_yaml: str, resume: str, overwrite: bool, checkpoint: Path | None, step: int | None) -> None:
        """Make the directory continue ``checkpoint`` (at ``step``) or start fresh, and write the recipe.

        Checkpoints that do not verify (or are newer than the one resumed) and files or directories
        where ftl writes its own are moved aside; only ``resume: never`` with ``overwrite`` deletes
        an earlier run's checkpoints, as the recipe then asks.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        files = [self.recipe, self.metrics, self.data_stats, self.stopped, self.loss_plot, self.latest]
        dirs = [self.checkpoints, self.tensorboard]
        misplaced = [p for p in files if p.exists() and not p.is_file()] + [p for p in dirs if p.exists() and not p.is_dir()]
        if misplaced:
            log.warning("moved %s to %s: ftl writes its own there", ", ".join(p.name for p in misplaced), self.move_aside(misplaced))
        held = self.checkpoints.is_dir() and any(self.checkpoints.iterdir())
        if checkpoint is None:
            # A fresh start writes these anew; what is there (an attempt that never saved, or a user's
            # own files under ftl's names) is kept, out of the way, with what else cannot be used.
            leftovers = [p for p in (self.recipe, self.loss_plot, self.stopped) if p.exists()]
            if self.data_stats.exists() and not _is_data_stats(self.data_stats):
                leftovers.append(self.data_stats)
            if held and resume == "never" and overwrite and self.checkpoints.is_symlink():
                # what it points to is not this run directory's to delete: the link is set aside
                log.warning("output.overwrite: %s is a link to %s; moved the link to %s (its target is untouched)",
                            self.checkpoints, os.readlink(self.checkpoints), self.move_aside([self.checkpoints, self.metrics]))
            elif held and resume == "never" and overwrite:
                log.warning("output.overwrite: deleting the earlier run's checkpoints in %s", self.checkpoints)
                shutil.rmtree(self.checkpoints)
                self.metrics.unlink(missing_ok=True)
            elif held:
                names = ", ".join(sorted(p.name for p in self.step_dirs())) or "no step-N"
                aside = self.move_aside([self.checkpoints, self.metrics, *leftovers])
                log.warning("%s holds no checkpoint that verifies (%s): moved it and metrics.jsonl to %s; starting from step 0",
                            self.checkpoints, names, aside)
                leftovers = []
            elif self.metrics.exists():  # an attempt that never saved: its records are not this run's
                leftovers.append(self.metrics)
            if leftovers:
                log.warning("moved %s to %s: this run writes its own", ", ".join(p.name for p in leftovers),
                            self.move_aside(leftovers))
        else:
            self.stopped.unlink(missing_ok=True)  # ftl's own marker of the stop this run resumes from
        if checkpoint is not None and step is not None:
            if checkpoint.parent == self.checkpoints:
                newer = [p for p in self.step_dirs() if step_of(p) > step]
                if newer:
                    log.warning("checkpoints after step %d that do not verify were moved to %s", step, self.move_aside(newer))
            # Records after the checkpoint belong to steps that will run again.
            if self.metrics.exists():
                kept = [r for r in read_metrics(self.metrics) if r["step"] <= step]
                write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        write_atomic(self.recipe, recipe_yaml)


def _is_data_stats(path: Path) -> bool:
    """Whether ``path`` is ftl's data statistics (``ftl preprocess`` writes them before a run)."""
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and "sources" in stats and "cache" in stats


def write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename: readers see the old file or the new one. The temporary name is per
    process, since several machines may write the same file into a shared run directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line that is not a record (a write torn by a kill) is skipped."""
    records, skipped = [], 0
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d line(s) that are not complete records (a write cut off by a kill?)", path, skipped)
    return records
