"""DeepSpeed ZeRO stage 1, 2 or 3 through Accelerate, with optional CPU offload.

Stage 1 partitions the optimizer states over the processes, stage 2 also the gradients, stage 3
also the weights (gathered layer by layer). Mixed precision is DeepSpeed's: a bf16/fp16 module
and fp32 master weights in its optimizer. DeepSpeed's own checkpoint lives under ``deepspeed/``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch

from ftl.errors import first_line
from ftl.distributed.strategies.base import CheckpointError, CheckpointFormatError, Strategy, is_peft

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ftl.recipe.schema import Recipe


class Zero(Strategy):
    multi_process = True
    distributed_type = "DEEPSPEED"
    uses_deepspeed = True
    offloads_optimizer = True
    own_optimizer = True
    fp32_master = True
    module_in_compute_dtype = True
    allocator_overhead = 0.35
    owns_optimizer_state = True
    shards_data_parallel = True

    def __init__(self, name: str, recipe: Recipe):
        super().__init__(name, recipe)
        self.zero_stage = int(name[-1])
        self.shards_weights = self.offloads_params = self.zero_stage == 3

    # ------------------------------------------------------------------------- memory and launch

    def place(self, weights: float, gradients: float, optimizer: float, layer_bytes: float) -> tuple[float, float, float, float]:
        zero, world, cpu = self.recipe.distributed.zero, self.dims.dp_shard, 0.0
        optimizer /= world
        if self.zero_stage >= 2:
            gradients /= world
        if self.zero_stage == 3:
            weights = weights / world + 2 * layer_bytes  # two layers gathered at a time (one prefetched)
        if zero.offload_optimizer:
            cpu, optimizer = cpu + optimizer, 0.0
        if self.zero_stage == 3 and zero.offload_params:
            cpu, weights = cpu + weights - 2 * layer_bytes, 2 * layer_bytes
        return weights, gradients, optimizer, cpu

    def accelerate_config(self, config: dict[str, Any], launch_dir: Path) -> dict[str, Any]:
        config = {k: v for k, v in super().accelerate_config(config, launch_dir).items()
                  if k != "mixed_precision"}  # Accelerate refuses it next to a DeepSpeed JSON, which has it
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(launch_dir / "deepspeed.json"),
            # The default (pdsh) starts only this node's processes with a wrong world view;
            # "standard" is torchrun on every machine, which is what Slurm and users start.
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": False,
        }
        return config

    def deepspeed_config(self, device: str) -> dict[str, Any]:
        """DeepSpeed JSON for this stage; the training loop owns accumulation and the LR schedule."""
        train, zero = self.recipe.train, self.recipe.distributed.zero
        optimization: dict[str, Any] = {
            "stage": self.zero_stage,
            "overlap_comm": zero.overlap_comm,
            "contiguous_gradients": zero.contiguous_gradients,
            "reduce_bucket_size": zero.reduce_bucket_size,
        }
        if self.zero_stage < 3:
            optimization["allgather_bucket_size"] = zero.allgather_bucket_size
        else:
            optimization.update(
                stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
                stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
                stage3_gather_16bit_weights_on_model_save=zero.gather_16bit_weights_on_model_save,
            )
        if zero.offload_optimizer:
            optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
        if zero.offload_params:
            optimization["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
        precision = train.mixed_precision
        return {
            "train_micro_batch_size_per_gpu": train.micro_batch_size,
            "gradient_accumulation_steps": train.gradient_accumulation_steps,
            "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * self.dims.dp,
            "gradient_clipping": train.max_grad_norm or 0.0,
            "zero_optimization": optimization,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            # Our AdamW (torch's, or DeepSpeed's CPU Adam when offloading) is built by ftl.training.optim.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1_000_000_000,
            "wall_clock_breakdown": False,
        }

    def launch_env(self, device: str) -> dict[str, str]:
        return {}  # ACCELERATE_USE_CPU would make Accelerate switch DeepSpeed off

    @property
    def accelerator_mixed_precision(self) -> str:
        return self.recipe.train.mixed_precision  # Accelerate checks it against the JSON

    @property
    def cpu_adam(self) -> bool:
        return self.recipe.distributed.zero.offload_optimizer

    # ------------------------------------------------------------------------- wrapping and steps

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        model, optimizer = accelerator.prepare(model, optimizer)
        self.check_wrapped(model)  # DeepSpeed scales fp16 losses itself
        return model, optimizer

    def prepare_reference(self, accelerator: Accelerator, reference: torch.nn.Module) -> torch.nn.Module:
        """An engine without optimizer: under ZeRO-3 the reference's weights are partitioned as the
        policy's (transformers loads both partitioned) and gathered layer by layer in its forward;
        under ZeRO-1/2, which shard only optimizer states and gradients, stage 0 holds it whole.
        Either way it runs in the policy's bf16/fp16."""
        import deepspeed

        config = self.deepspeed_config(accelerator.device.type)
        if self.zero_stage == 3:
            config["zero_optimization"].pop("offload_optimizer", None)
        else:
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=reference, config=config)
        engine.eval()  # (DeepSpeed's eval() returns None)
        return engine

    def check_wrapped(self, model: Any) -> None:
        found = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
        if found != self.zero_stage:
            self._wrong(f"a DeepSpeed engine with ZeRO stage {found}" if found is not None else type(model).__name__)

    def autocast(self, device: torch.device) -> ContextManager:
        return nullcontext()  # the engine runs the module in bf16/fp16 itself

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

    # ------------------------------------------------------------------------- checkpoints

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
        if not (checkpoint / "deepspeed").is_dir():
            raise CheckpointFormatError(f"{checkpoint}: no deepspeed/ state; resume with the strategy it was saved under")
        check_deepspeed_pickles(checkpoint)
        path, _ = model.load_checkpoint(
            str(checkpoint), tag="deepspeed", load_module_strict=not is_peft(model),
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if path is None:
            raise CheckpointError(f"{checkpoint}: DeepSpeed could not load deepspeed/")


def check_deepspeed_pickles(checkpoint: Path) -> None:
    """Refuse ``deepspeed/`` files that hold anything but tensors and plain data.

    DeepSpeed unpickles its files with ``weights_only=False``, where a planted object runs code.
    Reading each file first with the weights-only unpickler (memory-mapped, so tensors are not
    read) proves the same bytes hold nothing that could.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    for path in sorted((checkpoint / "deepspeed").rglob("*.pt")):
        try:
            with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # the unpickler's refusals, or a torn file
            raise CheckpointError(
                f"{path}: not loaded: it holds pickled objects that are not tensors or plain data "
                f"({_first_line(err)}); only load checkpoints you trust with DeepSpeed's own tools"
            ) from None


def zero_fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full-precision weights consolidated from a checkpoint's ``deepspeed/`` shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_deepspeed_pickles(checkpoint)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed")


def _first_line(err: Exception) -> str:
    """The unpickler's refusal, which its message buries under advice; else the first line."""
    refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line or "Unsupported operand" in line]
    return refused[0][:200] if refused else first_line(err)
