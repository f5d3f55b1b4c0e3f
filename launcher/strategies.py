"""Distributed strategies as objects: each decides everything about itself at run time.

``single`` (one process), ``ddp``, ``zero1``/``zero2``/``zero3`` (DeepSpeed through Accelerate) and
``fsdp2`` (torch's ``fully_shard``, called here on every decoder layer and then the root, because
Accelerate's FSDP path does not shard on CPU). A strategy owns how the model is wrapped and
checked, the three places where a training step differs (skipping gradient sync, backward, the
optimizer step) and its checkpoint format (the consolidated weights, and the sharded state that
replaces ``optimizer.pt``). The training loop and the checkpointer ask the strategy; nothing else
tells engines apart. Which strategy a recipe runs is decided once, by ``Recipe.strategy``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ftl.errors import UserError
from ftl.weights import DTYPES

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ftl.config import Recipe
    from ftl.plan import Plan

log = logging.getLogger(__name__)



class DistributedError(UserError):
    """The processes found at run time are not the ones the recipe planned."""


class CheckpointFormatError(UserError):
    """A checkpoint was saved under another strategy than the one resuming it."""


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") or hasattr(getattr(model, "module", None), "peft_config")


class Single:
    """One process: nothing to shard or synchronise; the optimizer state is ``optimizer.pt``."""

    name = "single"
    zero_stage: int | None = None
    owns_optimizer_state = False  # True: the checkpoint's sharded state replaces optimizer.pt

    def __init__(self, plan: Plan):
        self.plan = plan

    # ------------------------------------------------------------------------- wrapping

    def shard(self, model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.nn.Module:
        """Shard before the optimizer is built (FSDP2); the others wrap in :meth:`prepare`."""
        return model

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        model, optimizer = accelerator.prepare(model, optimizer)
        self.check_wrapped(model)
        return model, optimizer

    def check_wrapped(self, model: Any) -> None:
        """The model is wrapped the way this strategy needs; launchers fail quietly otherwise."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, (DistributedDataParallel, FSDPModule)) or hasattr(model, "zero_optimization_stage"):
            self._wrong(type(model).__name__)

    def _wrong(self, what: str) -> None:
        raise DistributedError(f"distributed: strategy {self.name} should have wrapped the model, but it is {what}")

    # ------------------------------------------------------------------------- inside a step

    @contextmanager
    def gradient_sync(self, accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
        """Skip the all-reduce/reduce-scatter on all but the last micro-batch of an optimizer step."""
        yield

    def backward(self, accelerator: Accelerator, model: Any, loss: torch.Tensor, last: bool) -> None:
        accelerator.backward(loss)

    def optimizer_step(self, accelerator: Accelerator, model: Any, optimizer: Any, max_norm: float | None) -> tuple[float, bool]:
        """Clip, step and zero the gradients; returns the gradient norm before clipping, and whether
        the step was taken (not on a non-finite gradient norm, which would ruin every weight; under
        fp16 the loss scaler already skips those steps and lowers its scale)."""
        params = [p for p in model.parameters() if p.requires_grad]
        norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        norm = float(norm) if norm is not None else float("nan")
        if accelerator.scaler is None and not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return norm, False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, True

    def discard_gradients(self, model: Any, optimizer: Any) -> None:
        """Drop the accumulated gradients of a step that will not be taken."""
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------- checkpoints

    def full_state_dict(self, accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor] | None | bool:
        """The whole model's weights on the main process (collective where sharded). None: the
        model's own state_dict will do; False: not available (ZeRO-3 without gathering)."""
        return None

    def save_state(self, model: Any, optimizer: Any, directory: Path) -> None:
        """Sharded model and optimizer state (every rank calls it); ``optimizer.pt`` otherwise."""

    def load_state(self, model: Any, optimizer: Any, checkpoint: Path) -> None:
        """Restore what :meth:`save_state` wrote (every rank calls it)."""


class DDP(Single):
    name = "ddp"

    def check_wrapped(self, model: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            self._wrong(type(model).__name__)

    @contextmanager
    def gradient_sync(self, accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
        if sync:
            yield
        else:
            with accelerator.no_sync(model):
                yield


class Zero(Single):
    """DeepSpeed ZeRO stage 1, 2 or 3, through Accelerate; DeepSpeed's own checkpoint under ``deepspeed/``."""

    owns_optimizer_state = True

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.name = plan.strategy
        self.zero_stage = int(plan.strategy[-1])

    def check_wrapped(self, model: Any) -> None:
        found = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
        if found != self.zero_stage:
            self._wrong(f"a DeepSpeed engine with ZeRO stage {found}" if found is not None else type(model).__name__)

    @contextmanager
    def gradient_sync(self, accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
        yield  # the accumulation boundary is set in backward()

    def backward(self, accelerator: Accelerator, model: Any, loss: torch.Tensor, last: bool) -> None:
        # The loop scales the loss for accumulation itself; DeepSpeed must not divide again.
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, accelerator: Accelerator, model: Any, optimizer: Any, max_norm: float | None) -> tuple[float, bool]:
        model.step()  # clips by gradient_clipping from the DeepSpeed JSON, steps, zeroes
        optimizer.step()  # Accelerate's no-op wrapper; tells the LR schedule that a step happened
        norm = model.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), True

    def discard_gradients(self, model: Any, optimizer: Any) -> None:
        pass  # DeepSpeed keeps them in its own buffers; nothing steps or saves them

    def full_state_dict(self, accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor] | None | bool:
        if self.zero_stage == 3 and not model.zero_gather_16bit_weights_on_model_save():
            if not is_peft(model):
                return False
            # An adapter is small: gather just the trainable parameters.
            import deepspeed

            trainable = {n: p for n, p in model.module.named_parameters() if p.requires_grad}
            with deepspeed.zero.GatheredParameters(list(trainable.values())):
                return {n: p.detach().cpu().clone() for n, p in trainable.items()}
        return accelerator.get_state_dict(model)

    def save_state(self, model: Any, optimizer: Any, directory: Path) -> None:
        # LoRA: the frozen base is in the model files already (and in model.path).
        model.save_checkpoint(str(directory), tag="deepspeed", exclude_frozen_parameters=is_peft(model))

    def load_state(self, model: Any, optimizer: Any, checkpoint: Path) -> None:
        from ftl.checkpoint import CheckpointError, check_deepspeed_pickles

        if not (checkpoint / "deepspeed").is_dir():
            raise CheckpointFormatError(f"{checkpoint}: no deepspeed/ state; resume with the strategy it was saved under")
        check_deepspeed_pickles(checkpoint)
        path, _ = model.load_checkpoint(
            str(checkpoint), tag="deepspeed", load_module_strict=not is_peft(model),
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if path is None:
            raise CheckpointError(f"{checkpoint}: DeepSpeed could not load deepspeed/")


class FSDP2(Single):
    """torch FSDP2: every decoder layer and the root sharded; a distributed checkpoint under ``dcp/``."""

    name = "fsdp2"
    owns_optimizer_state = True

    def shard(self, model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        fsdp = recipe.distributed.fsdp
        param_dtype = fsdp.param_dtype
        if param_dtype == "auto":
            param_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(recipe.train.mixed_precision)
        options = {
            "mesh": init_device_mesh(self.plan.device, (self.plan.world_size,)),
            "reshard_after_forward": fsdp.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=DTYPES[param_dtype] if param_dtype else None, reduce_dtype=DTYPES[fsdp.reduce_dtype]
            ),
            "offload_policy": CPUOffloadPolicy(pin_memory=self.plan.device == "cuda") if fsdp.cpu_offload else OffloadPolicy(),
        }
        if not fsdp.cpu_offload and not getattr(model, "is_loaded_in_4bit", False):
            model.to(device)
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        log.info("FSDP2: sharded %d decoder layers and the root over %d processes", len(layers), self.plan.world_size)
        return model

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        optimizer = accelerator.prepare(optimizer)  # the model is sharded already
        self.check_wrapped(model)
        return model, optimizer

    def check_wrapped(self, model: Any) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            self._wrong(type(model).__name__)

    @contextmanager
    def gradient_sync(self, accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
        if sync:
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def full_state_dict(self, accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor] | None | bool:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_state(self, model: Any, optimizer: Any, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / "dcp"))

    def load_state(self, model: Any, optimizer: Any, checkpoint: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (checkpoint / "dcp").is_dir():
            raise CheckpointFormatError(f"{checkpoint}: no dcp/ state; resume with the strategy it was saved under")
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(checkpoint / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, by the class names transformers lists in ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(
            f"distributed.strategy: fsdp2 found no decoder layers in {type(base).__name__} "
            f"(_no_split_modules={sorted(names)}); use zero3 or ddp for this architecture"
        )
    return layers


STRATEGIES: dict[str, type[Single]] = {"single": Single, "ddp": DDP, "zero1": Zero, "zero2": Zero, "zero3": Zero, "fsdp2": FSDP2}


def for_plan(plan: Plan) -> Single:
    """The strategy object of a plan (``plan.strategy`` is already resolved from ``auto``)."""
    return STRATEGIES[plan.strategy](plan)
