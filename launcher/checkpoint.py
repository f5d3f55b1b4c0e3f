"""Checkpoints in the run directory: ``checkpoints/step-N/`` plus a ``latest`` pointer.

A checkpoint is written into ``step-N.tmp/`` and renamed when complete, and ``latest`` is
replaced atomically after that, so a kill at any moment leaves either the old or the new
checkpoint, never half of one. A checkpoint holds what a user loads: the PEFT adapter (LoRA) or the
full model in safetensors (full fine-tuning), the tokenizer, and ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

LATEST = "latest"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator: Accelerator, model: Any, tokenizer: Any, run_dir: Path, step: int, state: dict) -> Path:
    """Save on the main process; every rank must call this (it synchronises)."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(checkpoints_dir(run_dir) / LATEST, final.name)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
