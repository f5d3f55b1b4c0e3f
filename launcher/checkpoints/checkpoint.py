"""Checkpoints that survive anything: atomic, verified, and enough to continue the run exactly.

Layout of the run directory::

    checkpoints/step-N/      model (PEFT adapter or full model, safetensors), tokenizer,
                             optimizer.pt, scheduler.pt, rng_state_rank{R}.pt,
                             trainer_state.json (step, epoch, data position), manifest.json
                             deepspeed/  instead of optimizer.pt under ZeRO: DeepSpeed's own
                                         checkpoint (partitioned optimizer states per rank)
                             dcp/        instead of optimizer.pt under FSDP2: torch distributed
                                         checkpoint of the sharded model and optimizer
    checkpoints/latest       name of the newest complete checkpoint
    checkpoints/best         name of the best one by train.early_stopping's metric (kept by keep_last)

The model files are always a consolidated, loadable model (gathered from the shards), so
``ftl eval`` and export work from any checkpoint; the one exception is ZeRO-3 with
``distributed.zero.gather_16bit_weights_on_model_save: false``, where only ``deepspeed/`` holds
the weights (DeepSpeed's ``zero_to_fp32`` consolidates them).

A checkpoint is written into ``step-N.tmp/``, every file is fsynced, ``manifest.json`` (size and
sha256 of every file) is written last, the directory is renamed, and only then is ``latest``
replaced (write + rename). A kill at any moment leaves the previous checkpoint intact; a
checkpoint whose files do not match its manifest is skipped with a warning when resuming.
Our files load with ``weights_only=True``: no pickle in them can run code. DeepSpeed loads its own
``deepspeed/`` files with ``weights_only=False``; ``strategies.zero.check_deepspeed_pickles`` first reads every
one of them with torch's weights-only unpickler (tensors, plain data and two DeepSpeed value
classes), so a planted pickle is refused before DeepSpeed sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator

from ftl.errors import first_line
from ftl.checkpoints.rundir import RunDir, step_of, write_atomic
from ftl.distributed.strategies import CheckpointError, Strategy
from ftl.training.state import TrainState, rng_state
from ftl.checkpoints.weights import safetensors_files

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
RECIPE = "run.yaml"


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    accelerator: Accelerator,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run_dir: Path,
    state: TrainState,
    strategy: Strategy,
    keep_last: int | None = None,
    recipe_yaml: str | None = None,
    best: bool = False,
) -> Path:
    """Save everything needed to continue; every rank must call this (it synchronises). The
    strategy decides the format: consolidated weights always, its sharded state where it has one.
    ``best``: it is also the run's best checkpoint (``checkpoints/best``, after ``latest``)."""
    step = state.step
    run = RunDir(run_dir)
    final = run.checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = strategy.full_state_dict(accelerator, model)  # collective under ZeRO-3 and FSDP2
    with _writing(tmp, run):
        strategy.save_state(model, optimizer, tmp)  # collective; nothing for one process and DDP
    if accelerator.is_main_process:
        with _writing(tmp, run):
            if weights is not False:
                accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            if not strategy.owns_optimizer_state:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE).write_text(json.dumps(state.shared(), indent=2))
            if recipe_yaml is not None:  # the recipe that trained it: a resume checks its own against this one
                (tmp / RECIPE).write_text(recipe_yaml)
    accelerator.wait_for_everyone()
    with _writing(tmp, run):
        torch.save(rng_state(), tmp / f"rng_state_rank{accelerator.process_index}.pt")
        if state.data is not None:
            (tmp / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(state.data))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _writing(tmp, run):
            write_manifest(tmp)
        if final.exists():  # not this run's (it resumed before this step): kept, out of the way
            log.warning("moved an earlier %s to %s", final.name, run.move_aside([final]))
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        write_atomic(run.latest, final.name)
        if best:
            write_atomic(run.best, final.name)
        if keep_last:
            _prune(run_dir, keep_last, keep=final)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _writing(tmp: Path, run: RunDir) -> Iterator[None]:
    """A write that fails (a full disk, a quota, a vanished mount) leaves no half checkpoint and is
    one line naming what is intact; torch reports a full disk as a RuntimeError of its writer."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "write" not in str(err).lower():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        latest = run.latest.read_text().strip() if run.latest.is_file() else None
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise CheckpointError(f"{tmp.parent}: could not write checkpoint {tmp.name.removesuffix('.tmp')}: {reason}; "
                              + (f"{latest} is intact and a resume continues from it" if latest else "no earlier checkpoint")
                              + " (free space and run the same command)") from None


def write_manifest(directory: Path) -> None:
    """fsync every file, then record its size and sha256 in ``manifest.json`` (fsynced too)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def _prune(run_dir: Path, keep_last: int, keep: Path) -> None:
    """The newest ``keep_last`` checkpoints stay, and the best one besides them."""
    run = RunDir(run_dir)
    complete = sorted(run.step_dirs(), key=step_of)
    for old in complete[: max(0, len(complete) - keep_last)]:
        if old != keep and old != run.best_checkpoint():
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- finding and verifying


def verify(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless every file listed in the manifest is intact."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        files = json.loads(manifest_path.read_bytes())["files"]
        entries = [(str(name), int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{directory}: unreadable {MANIFEST} (expected files: {{name: {{size, sha256}}}})") from None
    for name, size, sha256 in entries:
        path = directory / name
        if not path.resolve().is_relative_to(directory.resolve()):
            raise CheckpointError(f"{directory}: {MANIFEST} names a file outside the checkpoint ({name})")
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, manifest says {size}")
        if _sha256(path) != sha256:
            raise CheckpointError(f"{directory}: {name} does not match its checksum")
    read_state(directory)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, with the fields resuming needs checked."""
    try:
        state = json.loads((checkpoint / STATE).read_bytes())
    except OSError:
        raise CheckpointError(f"{checkpoint}: no readable {STATE}") from None
    except ValueError:
        raise CheckpointError(f"{checkpoint}: {STATE} is not JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
        raise CheckpointError(f"{checkpoint}: {STATE} has no step (a non-negative integer)")
    total = state.get("total_steps")
    if state["step"] > 10**9 or (isinstance(total, int) and not isinstance(total, bool) and 0 < total < state["step"]):
        raise CheckpointError(f"{checkpoint}: {STATE} says step {str(state['step'])[:20]} of {total}, which no run reaches; "
                              "resume from another checkpoint")
    return state


def find_resumable(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are skipped with a warning."""
    run = RunDir(run_dir)
    candidates = sorted(run.step_dirs(), key=step_of, reverse=True)
    pointer = run.latest
    if pointer.is_file():
        named = pointer.read_bytes().decode("utf-8", "replace").strip()
        # Anything newer than `latest` was never declared complete.
        if step_of(named) >= 0:
            candidates = [c for c in candidates if step_of(c) <= step_of(named)]
    for candidate in candidates:
        try:
            verify(candidate)
            return candidate
        except CheckpointError as err:
            log.warning("skipping broken checkpoint: %s", err)
    return None


# ----------------------------------------------------------------------------- loading


def load_training_state(
    checkpoint: Path, accelerator: Accelerator, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, strategy: Strategy
) -> TrainState:
    """Load weights, optimizer and scheduler from a verified checkpoint; return its TrainState
    (with this rank's RNG and data position)."""
    rank = accelerator.process_index
    if strategy.owns_optimizer_state:
        strategy.load_state(model, optimizer, checkpoint)
    else:
        if not (checkpoint / "optimizer.pt").is_file():
            raise CheckpointError(f"{checkpoint}: no optimizer.pt (saved under ZeRO or FSDP2); resume with the strategy it was saved under")
        _load_weights(accelerator.unwrap_model(model), checkpoint)
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    rng_file = checkpoint / f"rng_state_rank{rank}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{checkpoint}: no RNG state for rank {rank}; resume with the same number of processes")
    state = TrainState.from_shared(read_state(checkpoint))
    state.rng = torch.load(rng_file, weights_only=True)
    data_file = checkpoint / f"data_state_rank{rank}.json"
    if data_file.exists():
        state.data = json.loads(data_file.read_text())
    return state


def _load_weights(model: Any, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{checkpoint}: adapter does not fit this model ({result.unexpected_keys[:3]})")
        return
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(checkpoint):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{checkpoint}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
