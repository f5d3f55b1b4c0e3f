"""Which checkpoint a run continues from (``train.resume``), and whether the recipe may continue it.

Checked before anything is loaded, by ``ftl train`` before it starts processes and by every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ftl import objectives
from ftl.checkpoints.checkpoint import RECIPE, find_resumable, read_state, verify
from ftl.recipe.schema import Recipe
from ftl.errors import UserError
from ftl.checkpoints.rundir import RunDir
from ftl.checkpoints.weights import weights_identity


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
    check_same_base(checkpoint, state, recipe.model.path, "resume with the base it was trained on, or start a new run")
    if (checkpoint / RECIPE).is_file():  # (checkpoints of earlier versions hold no recipe)
        _check_changes(checkpoint, recipe)
    _check_steps(checkpoint, state, recipe)
    _check_world(checkpoint, recipe)


# Fields a checkpoint cannot continue under another value: its tensors' shapes and names, or what is trained.
NEVER = ("method.type", "method.objective", "method.lora.r", "method.lora.use_dora", "method.lora.modules_to_save",
         "method.lora.target_modules", "method.lora.dtype", "quantization.")
# Fields that do not change what a step computes (or are checked elsewhere: model.path by identity,
# the number of steps below; the parallel layout by the strategy's own resume checks).
FREE = ("model.path", "model.attn_implementation", "model.trust_remote_code", "data.cache_dir", "train.max_steps",
        "train.epochs", "train.eval_steps", "train.save_steps", "train.save_minutes", "train.logging_steps", "train.resume", "train.allow_changed",
        "train.peak_tflops", "train.early_stopping", "train.compile", "train.gradient_checkpointing", "train.mixed_precision")
COMPARED = ("model", "method", "quantization", "data", *objectives.SECTIONS, "train")


def changed_fields(saved: dict, current: dict) -> dict[str, tuple[object, object]]:
    """Dotted recipe fields whose values differ (saved, current), among those that alter training."""
    def flat(value: object, prefix: str) -> dict[str, object]:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
        return {prefix: value}

    old = {k: v for section in COMPARED for k, v in flat(saved.get(section), section).items()}
    new = {k: v for section in COMPARED for k, v in flat(current.get(section), section).items()}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(FREE)}


def _check_changes(checkpoint: Path, recipe: Recipe) -> None:
    """A resumed run is the same run: a field changed since the checkpoint is refused in one line,
    unless it can be honoured and ``train.allow_changed`` names it (then the new value holds from the
    checkpoint's step on)."""
    try:
        saved = yaml.safe_load((checkpoint / RECIPE).read_text())
    except (OSError, yaml.YAMLError):
        raise TrainError(f"{checkpoint / RECIPE}: not readable YAML; resume from another checkpoint") from None
    current = recipe.model_dump(mode="json")
    for field, (old, new) in changed_fields(saved if isinstance(saved, dict) else {}, current).items():
        if field.startswith(NEVER):
            raise TrainError(f"{field}: is {new!r} but {checkpoint} was trained with {old!r}, which a resumed run cannot "
                             "change; resume with the same setting, or start a new run (another output.dir, or "
                             "train.resume=never with output.overwrite=true)")
        if field not in recipe.train.allow_changed:
            raise TrainError(f"{field}: is {new!r} but {checkpoint} was trained with {old!r}; resume with the same value, "
                             f"or pass --allow-changed {field} to continue with the new one from this checkpoint on")


def _check_world(checkpoint: Path, recipe: Recipe) -> None:
    """Each rank continues its own RNG streams (and, under ZeRO/FSDP2, its shard): a checkpoint
    resumes on as many processes as saved it. Checked before any process starts (``ftl train``'s
    preflight), not found by one rank of many."""
    saved = len(list(checkpoint.glob("rng_state_rank*.pt")))
    if saved and saved != recipe.world_size:
        raise TrainError(f"distributed: {checkpoint} was saved by {saved} process(es) and this run has {recipe.world_size} "
                         f"(num_processes x num_machines); resume with {saved}, or start a new run")


def _check_steps(checkpoint: Path, state: dict, recipe: Recipe) -> None:
    if recipe.train.max_steps is not None and recipe.train.max_steps < state["step"]:
        raise TrainError(f"train.max_steps: {recipe.train.max_steps} is below the step of {checkpoint} ({state['step']}); "
                         "raise it, or start a new run")


def check_same_base(checkpoint: Path, state: dict, path: str, fix: str, error: type[UserError] = TrainError) -> None:
    """An adapter means something only on the base it was trained on: a model replaced at the same
    path (even with the same shapes) is refused, not silently used."""
    saved = state.get("base_identity")  # (checkpoints of earlier versions did not record it)
    if saved is not None and weights_identity(path) != saved:
        raise error(f"model.path: the model at {path} is not the one {checkpoint} was trained on (its weight files "
                         f"differ from what the checkpoint recorded); {fix}")
