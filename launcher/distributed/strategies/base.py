"""The interface every strategy implements (see ``ftl.distributed.strategies``), and the one-process strategy.

Capabilities are class attributes, read by the strategy's own rules (:meth:`Strategy.check`) and
memory terms (:meth:`Strategy.place`); the interface's hooks do what one process does, and each
strategy changes the attributes and the hooks that differ.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch

from ftl.errors import UserError
from ftl.distributed.parallel_dims import ParallelDims
from ftl.precision import autocast_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ftl.recipe.schema import Recipe

log = logging.getLogger(__name__)

Problems = list[tuple[tuple, str]]  # (key path, message), as ftl.recipe.rules reports them


class DistributedError(UserError):
    """The processes found at run time are not the ones the recipe planned."""


class CheckpointError(UserError):
    """A checkpoint is incomplete or does not match its manifest."""


class CheckpointFormatError(UserError):
    """A checkpoint was saved under another strategy than the one resuming it."""


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") or hasattr(getattr(model, "module", None), "peft_config")


class Strategy:
    """How a run's processes hold the model and take a step. The hooks as written are those of one
    process: nothing to shard or synchronise; the optimizer state is ``optimizer.pt``."""

    multi_process = False  # needs 2 or more processes
    distributed_type = "NO"  # Accelerate's name for it
    uses_deepspeed = False
    shards_weights = False  # gathers weights (lm_head's too) only inside their module's forward
    offloads_optimizer = False  # distributed.zero.offload_optimizer applies
    offloads_params = False  # distributed.zero.offload_params applies
    own_optimizer = False  # runs its own optimizer implementation (no bitsandbytes optimizers)
    fp32_master = False  # under mixed precision: bf16/fp16 module, fp32 master weights in the optimizer
    owns_optimizer_state = False  # True: the checkpoint's sharded state replaces optimizer.pt
    shards_data_parallel = False  # the data-parallel ranks shard the model's state (ZeRO, FSDP2) or replicate it
    module_in_compute_dtype = False  # under mixed precision the module itself runs in bf16/fp16 (no autocast)
    # The caching allocator's reserved pool over its allocated peak: ~10% for one model and its
    # optimizer; sharded stacks churn buffers of many sizes (the 20-45% under DeepSpeed/FSDP).
    allocator_overhead = 0.10

    def __init__(self, name: str, recipe: Recipe):
        self.name = name
        self.recipe = recipe
        self.world_size = world = recipe.world_size
        self.dims = ParallelDims(dp_shard=world) if self.shards_data_parallel else ParallelDims(dp_replicate=world)
        self.scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (set in prepare)

    # ------------------------------------------------------------------------- rules

    def check(self) -> Problems:
        """Settings of the recipe this strategy cannot run: the rules that depend on the strategy,
        all here, always about the strategy the run uses (``auto`` already resolved)."""
        recipe = self.recipe
        dist, quant, zero = recipe.distributed, recipe.quantization, recipe.distributed.zero
        # Name the one auto resolved to, so a user sees why.
        named = f"strategy auto (here {self.name})" if dist.strategy == "auto" else f"strategy {self.name}"
        problems: Problems = []
        if not self.multi_process and self.world_size > 1:
            problems.append((("distributed", "strategy"), f"single means one process, but num_processes x num_machines = "
                             f"{self.world_size}; use ddp, zero1/2/3, fsdp2 or auto"))
        if self.multi_process and self.world_size == 1:
            problems.append((("distributed", "num_processes"), f"strategy {self.name} needs 2 or more processes; set "
                             "num_processes (per machine) or strategy: single"))
        if zero.offload_params and not self.offloads_params:
            problems.append((("distributed", "zero", "offload_params"), f"parameter offload needs strategy zero3, not {named}"))
        if zero.offload_optimizer and not self.offloads_optimizer:
            problems.append((("distributed", "zero", "offload_optimizer"), f"needs strategy zero1, zero2 or zero3, not {named} "
                             "(for fsdp2 use distributed.fsdp.cpu_offload)"))
        if recipe.train.compile and self.own_optimizer:
            problems.append((("train", "compile"), f"not supported under DeepSpeed ({named}), whose engine wraps the "
                             "layers in its own hooks; use ddp or fsdp2, or compile: false"))
        if self.own_optimizer and recipe.train.optimizer != "adamw_torch":
            problems.append((("train", "optimizer"), f"DeepSpeed ({named}) runs its own partitioned AdamW; use adamw_torch"))
        if self.shards_weights:
            if quant.bits is not None and quant.quant_storage == "uint8":
                problems.append((("quantization", "quant_storage"), f"{named} shards only floating-point tensors; set "
                                 "quant_storage: bfloat16 (the compute dtype)"))
            if quant.bits == 8:
                problems.append((("quantization", "bits"), f"8-bit bases cannot be sharded by {named}; use 4 bits with "
                                 "quant_storage, or ddp"))
            if isinstance(recipe.kernels, list) and "fused_ce" in recipe.kernels:
                problems.append((("kernels",), f"fused_ce reads lm_head's weight outside its forward, which {self.name} "
                                 "keeps sharded there; leave fused_ce out (kernels: auto does)"))
        return problems

    def uses_fused_ce(self) -> bool:
        """Whether the fused cross-entropy runs: listed, or ``kernels: auto`` where lm_head is whole."""
        kernels = self.recipe.kernels
        if kernels == "auto":
            return not self.shards_weights
        return isinstance(kernels, list) and "fused_ce" in kernels

    # ------------------------------------------------------------------------- memory

    def place(self, weights: float, gradients: float, optimizer: float, layer_bytes: float) -> tuple[float, float, float, float]:
        """Bytes per device of (weights, gradients, optimizer states) given their unsharded sizes,
        and the bytes moved to CPU memory; ``layer_bytes`` is one decoder layer's weights."""
        return weights, gradients, optimizer, 0.0

    # ------------------------------------------------------------------------- launch

    def accelerate_config(self, config: dict[str, Any], launch_dir: Path) -> dict[str, Any]:
        """What this strategy adds to ``accelerate.yaml`` (see ``ftl.distributed.plan``)."""
        return {**config, "distributed_type": self.distributed_type}

    def deepspeed_config(self, device: str) -> dict[str, Any] | None:
        """DeepSpeed's JSON, for the strategies that run DeepSpeed."""
        return None

    def launch_env(self, device: str) -> dict[str, str]:
        # `accelerate launch --cpu` starts one process whatever --num_processes says; this does not.
        return {"ACCELERATE_USE_CPU": "true"} if device == "cpu" else {}

    @property
    def accelerator_mixed_precision(self) -> str:
        """What Accelerate is told: nothing, since :meth:`autocast` and the loss scaler are ours (so
        one process can run recipes of different precisions one after another)."""
        return "no"

    @property
    def cpu_adam(self) -> bool:
        """Step with DeepSpeed's CPU Adam (optimizer offload)."""
        return False

    # ------------------------------------------------------------------------- wrapping

    def shard(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Shard before the optimizer is built (FSDP2); the others wrap in :meth:`prepare`."""
        return model

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        model, optimizer = accelerator.prepare(model, optimizer)
        self.check_wrapped(model)
        self._make_scaler(accelerator.device)
        return model, optimizer

    def prepare_reference(self, accelerator: Accelerator, reference: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the starting model (the reference of full-fine-tuning DPO/IPO), held and
        run as this strategy holds and runs the policy: here whole, under the same autocast."""
        return reference.to(accelerator.device)

    def _make_scaler(self, device: torch.device) -> None:
        if self.recipe.train.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)

    def check_wrapped(self, model: Any) -> None:
        """The model is wrapped the way this strategy needs; launchers fail quietly otherwise."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, (DistributedDataParallel, FSDPModule)) or hasattr(model, "zero_optimization_stage"):
            self._wrong(type(model).__name__)

    def _wrong(self, what: str) -> None:
        raise DistributedError(f"distributed: strategy {self.name} should have wrapped the model, but it is {what}")

    # ------------------------------------------------------------------------- inside a step

    def autocast(self, device: torch.device) -> ContextManager:
        """Mixed precision of forward passes (``train.mixed_precision``)."""
        dtype = autocast_dtype(self.recipe.train.mixed_precision)
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    @contextmanager
    def gradient_sync(self, accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
        """Skip the all-reduce/reduce-scatter on all but the last micro-batch of an optimizer step."""
        yield

    def backward(self, accelerator: Accelerator, model: Any, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, accelerator: Accelerator, model: Any, optimizer: Any, max_norm: float | None) -> tuple[float, bool]:
        """Clip, step and zero the gradients; returns the gradient norm before clipping, and whether
        the step was taken (not on a non-finite gradient norm, which would ruin every weight; under
        fp16 the loss scaler skips those steps itself and lowers its scale)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        norm = float(norm) if norm is not None else float("nan")
        if self.scaler is None and not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return norm, False
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
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


class Single(Strategy):
    """One process: the interface's hooks as they are."""
