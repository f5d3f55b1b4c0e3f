"""The process group and the model wrapping each strategy needs, and the guard that checks them.

DDP and DeepSpeed ZeRO come from Accelerate (``Accelerator.prepare``); FSDP2 is torch's
``fully_shard`` called here, on every decoder layer and then the root, because Accelerate's FSDP
path does not shard on CPU. The few places where the strategies differ inside a training step
(skipping gradient sync, backward, the optimizer step) are the three small functions at the end,
so the loop in ``ftl.train`` stays one loop.

Launchers fail quietly: ``accelerate launch --cpu`` starts one process whatever
``--num_processes`` says, and ``--multi_gpu`` on a CPU machine starts processes that never talk.
:func:`check_process_group` and :func:`check_wrapped` stop such a run on every rank with what was
expected and what was found.
"""

from __future__ import annotations

import math

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

from ftl.config import Recipe
from ftl.errors import UserError
from ftl.plan import Plan

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DistributedError(UserError):
    """The processes found at run time are not the ones the recipe planned."""


def build_accelerator(recipe: Recipe, plan: Plan) -> Accelerator:
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if plan.device == "cuda" else "gloo"
        # gloo on CPU also for DeepSpeed: without it Accelerate sees one process per rank.
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=recipe.distributed.timeout_minutes)))
    deepspeed = DeepSpeedPlugin(hf_ds_config=plan.deepspeed) if plan.deepspeed is not None else None
    return Accelerator(
        cpu=plan.device == "cpu" and deepspeed is None,  # Accelerate turns DeepSpeed off under cpu=True
        mixed_precision=recipe.train.mixed_precision,
        deepspeed_plugin=deepspeed,
        kwargs_handlers=handlers,
    )


def check_process_group(accelerator: Accelerator, plan: Plan) -> None:
    """Every rank: the world size and strategy the launcher produced are the ones planned."""
    found = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    hint = "start it with `ftl train RECIPE`, or the command `ftl plan RECIPE` prints"
    if found != plan.world_size or launched != plan.world_size:
        raise DistributedError(
            f"distributed: the recipe plans {plan.world_size} process(es) ({plan.strategy}: "
            f"{plan.num_machines} machine(s) x {plan.num_processes}), but this process is rank "
            f"{accelerator.process_index} of {found} (WORLD_SIZE={launched}); {hint}"
        )
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if (plan.zero_stage is not None) != is_deepspeed:
        raise DistributedError(
            f"distributed: the recipe plans {plan.strategy}, but Accelerate runs {accelerator.distributed_type.value}; {hint}"
        )


def shard(model: torch.nn.Module, recipe: Recipe, plan: Plan, device: torch.device) -> torch.nn.Module:
    """FSDP2: shard every decoder layer, then the root. Other strategies wrap in :func:`prepare`."""
    if plan.strategy != "fsdp2":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    fsdp = recipe.distributed.fsdp
    param_dtype = fsdp.param_dtype
    if param_dtype == "auto":
        param_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(recipe.train.mixed_precision)
    options = {
        "mesh": init_device_mesh(plan.device, (plan.world_size,)),
        "reshard_after_forward": fsdp.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[param_dtype] if param_dtype else None, reduce_dtype=DTYPES[fsdp.reduce_dtype]
        ),
        "offload_policy": CPUOffloadPolicy(pin_memory=plan.device == "cuda") if fsdp.cpu_offload else OffloadPolicy(),
    }
    if not fsdp.cpu_offload and not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    log.info("FSDP2: sharded %d decoder layers and the root over %d processes", len(layers), plan.world_size)
    return model


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


def prepare(accelerator: Accelerator, plan: Plan, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """Wrap for DDP/DeepSpeed through Accelerate (FSDP2 is already sharded) and check the result."""
    if plan.strategy == "fsdp2":
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    check_wrapped(model, plan)
    return model, optimizer


def check_wrapped(model: Any, plan: Plan) -> None:
    """The model is wrapped the way the strategy needs (DDP, a ZeRO engine of the right stage, FSDP)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if plan.zero_stage is not None:
        found = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
        ok, what = found == plan.zero_stage, f"a DeepSpeed engine with ZeRO stage {found}" if found is not None else type(model).__name__
    elif plan.strategy == "ddp":
        ok, what = isinstance(model, DistributedDataParallel), type(model).__name__
    elif plan.strategy == "fsdp2":
        ok, what = isinstance(model, FSDPModule), type(model).__name__
    else:
        ok, what = not isinstance(model, (DistributedDataParallel, FSDPModule)), type(model).__name__
    if not ok:
        raise DistributedError(f"distributed: strategy {plan.strategy} should have wrapped the model, but it is {what}")


# ----------------------------------------------------------------------------- inside a step


def is_deepspeed(model: Any) -> bool:
    return hasattr(model, "zero_optimization_stage")


@contextmanager
def gradient_sync(accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
    """Skip the all-reduce/reduce-scatter on all but the last micro-batch of an optimizer step."""
    if sync or is_deepspeed(model):  # DeepSpeed: the accumulation boundary is set in backward()
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def backward(accelerator: Accelerator, model: Any, loss: torch.Tensor, last: bool) -> None:
    if is_deepspeed(model):
        # The loop scales the loss for accumulation itself; DeepSpeed must not divide again.
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def optimizer_step(accelerator: Accelerator, model: Any, optimizer: Any, max_norm: float | None) -> tuple[float, bool]:
    """Clip, step and zero the gradients; returns the gradient norm before clipping, and whether
    the step was taken (not on a non-finite gradient norm, which would ruin every weight; under
    fp16 the loss scaler already skips those steps and lowers its scale)."""
    if is_deepspeed(model):
        model.step()  # clips by gradient_clipping from the DeepSpeed JSON, steps, zeroes
        optimizer.step()  # Accelerate's no-op wrapper; tells the LR schedule that a step happened
        norm = model.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), True
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


def discard_gradients(model: Any, optimizer: Any) -> None:
    """Drop the accumulated gradients of a step that will not be taken."""
    if not is_deepspeed(model):  # DeepSpeed keeps them in its own buffers; nothing steps or saves them
        optimizer.zero_grad(set_to_none=True)
