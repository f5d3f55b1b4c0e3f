"""Which checkpoint a run continues from (``train.resume``), and whether the recipe may continue it.

Checked before anything is loaded, by ``ftl train`` before it starts processes and by every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftl.checkpoint import find_resumable, read_state, verify
from ftl.config import Recipe
from ftl.errors import UserError
from ftl.rundir import RunDir


class TrainError(UserError):
    """The run cannot start as the recipe asks (run directory, data size, resume point)."""


def resume_point(recipe: Recipe) -> Path | None:
    """The checkpoint to continue from, as ``train.resume`` says, checked against the recipe; and
    refuse a fresh start in a run directory that holds checkpoints, before anything is loaded."""
    run_dir = Path(recipe.output.dir)
    mode = recipe.train.resume
    checkpoint = None
    if mode == "auto":
        checkpoint = find_resumable(run_dir)
    elif mode != "never":
        checkpoint = Path(mode).expanduser()
        if not checkpoint.is_dir():
            raise TrainError(f"train.resume: {checkpoint} is not a checkpoint directory (or use auto / never)")
        verify(checkpoint)
    if checkpoint is not None:
        _check_same_method(checkpoint, recipe)
    ckpts = RunDir(run_dir).checkpoints
    if checkpoint is None and mode == "never" and not recipe.output.overwrite and ckpts.is_dir() and any(ckpts.iterdir()):
        raise TrainError(
            f"output.dir: {run_dir} already holds checkpoints of an earlier run; use train.resume=auto to "
            "continue it, another output.dir, or output.overwrite=true to replace them"
        )
    return checkpoint


def _check_same_method(checkpoint: Path, recipe: Recipe) -> None:
    """A checkpoint continues only the training it came from (method, quantization, LoRA rank)."""
    state = read_state(checkpoint)
    saved = {"method.type": state.get("method", recipe.method.type), "quantization.bits": state.get("bits", recipe.quantization.bits)}
    adapter_file = checkpoint / "adapter_config.json"
    if adapter_file.is_file() and recipe.method.type != "full":
        try:
            saved["method.lora.r"] = json.loads(adapter_file.read_bytes()).get("r", recipe.method.lora.r)
        except (ValueError, AttributeError):
            raise TrainError(f"{adapter_file}: not a readable adapter config; resume from another checkpoint") from None
    wanted = {"method.type": recipe.method.type, "quantization.bits": recipe.quantization.bits, "method.lora.r": recipe.method.lora.r}
    for key, value in saved.items():
        if value != wanted[key]:
            raise TrainError(f"{key}: is {wanted[key]} but {checkpoint} was trained with {value}; resume with the same "
                             "setting, or start a new run (another output.dir, or train.resume=never with output.overwrite=true)")
