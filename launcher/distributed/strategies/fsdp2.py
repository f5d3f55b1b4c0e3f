"""torch FSDP2: every decoder layer and the root sharded; a distributed checkpoint under ``dcp/``.

``fully_shard`` is called here on every decoder layer and then the root, because Accelerate's
FSDP path does not shard on CPU.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ftl.models.families import decoder_layers
from ftl.distributed.strategies.base import CheckpointFormatError, Strategy
from ftl.precision import DTYPES, mixed_dtype_name

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


class FSDP2(Strategy):
    multi_process = True
    distributed_type = "MULTI_GPU"
    shards_weights = True
    owns_optimizer_state = True
    shards_data_parallel = True
    module_in_compute_dtype = True  # MixedPrecisionPolicy gathers the layers in param_dtype
    allocator_overhead = 0.30

    def place(self, weights: float, gradients: float, optimizer: float, layer_bytes: float) -> tuple[float, float, float, float]:
        fsdp, world = self.recipe.distributed.fsdp, self.dims.dp_shard
        optimizer, gradients = optimizer / world, gradients / world
        if fsdp.reshard_after_forward:
            weights = weights / world + 2 * layer_bytes  # two layers gathered at a time (one prefetched)
        if fsdp.cpu_offload:
            return 2 * layer_bytes, 0.0, 0.0, weights - 2 * layer_bytes + gradients + optimizer
        return weights, gradients, optimizer, 0.0

    def shard(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        fsdp = self.recipe.distributed.fsdp
        param_dtype = fsdp.param_dtype
        if param_dtype == "auto":
            param_dtype = mixed_dtype_name(self.recipe.train.mixed_precision)
        options = {
            "mesh": self.dims.mesh(device.type)["dp_shard"],
            "reshard_after_forward": fsdp.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=DTYPES[param_dtype] if param_dtype else None, reduce_dtype=DTYPES[fsdp.reduce_dtype]
            ),
            "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if fsdp.cpu_offload else OffloadPolicy(),
        }
        if not fsdp.cpu_offload and not getattr(model, "is_loaded_in_4bit", False):
            model.to(device)
        layers = decoder_layers(model, "distributed.strategy: fsdp2", "use zero3 or ddp for this architecture")
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
        log.info("FSDP2: sharded %d decoder layers and the root over %d processes", len(layers), self.dims.dp_shard)
        return model

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        optimizer = accelerator.prepare(optimizer)  # the model is sharded already
        self.check_wrapped(model)
        self._make_scaler(accelerator.device)
        return model, optimizer

    def prepare_reference(self, accelerator: Accelerator, reference: torch.nn.Module) -> torch.nn.Module:
        """Sharded as the policy (same mesh, mixed precision and offload). Each layer, and the root,
        is freed right after its forward: nothing of the reference stays gathered, since no backward
        follows (``reshard_after_forward: false`` is for the policy)."""
        reference = self.shard(reference, accelerator.device)
        reference.set_reshard_after_forward(True)
        return reference

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
