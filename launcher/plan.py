"""How a recipe runs: strategy, world size, DeepSpeed JSON, Accelerate config and launch command.

The plan is a pure function of the recipe (and whether this machine has CUDA), so ``ftl plan``
prints exactly what ``ftl train`` launches, and every rank recomputes it to check that the
process group it finds is the one the recipe asked for (see ``ftl.distributed``).

``distributed.strategy: auto`` picks, from the world size and the method: one process ->
``single``; LoRA/QLoRA (few trainable parameters, the frozen base fits each device) -> ``ddp``;
full fine-tuning (weights, gradients and Adam states of every parameter: 16 bytes/parameter in
mixed precision) -> ``zero3``, which shards all of them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ftl.config import Recipe
from ftl.rundir import RunDir, write_atomic

DEEPSPEED_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


@dataclass
class Plan:
    strategy: str
    num_processes: int  # per machine
    num_machines: int
    machine_rank: int
    device: str  # cuda | cpu
    launch_dir: Path
    deepspeed: dict[str, Any] | None = None
    accelerate: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def zero_stage(self) -> int | None:
        return DEEPSPEED_STAGES.get(self.strategy)

    def shell_command(self) -> str:
        """The launch as a user would type it (environment first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = ["accelerate", "launch", *self.command[3:]] if self.command[1:3] == ["-m", "accelerate.commands.launch"] else ["python", *self.command[1:]]
        return (env + " " if env else "") + shlex.join(cmd)

    def summary(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "world_size": self.world_size,
            "num_processes": self.num_processes,
            "num_machines": self.num_machines,
            "machine_rank": self.machine_rank,
            "device": self.device,
        }


def resolve_strategy(recipe: Recipe) -> str:
    """The strategy the run uses (``Recipe.strategy`` decides ``auto``)."""
    return recipe.strategy


def make_plan(recipe: Recipe, device: str | None = None) -> Plan:
    """The plan for ``recipe`` (resolve paths first: every rank must read the same files)."""
    dist = recipe.distributed
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = Plan(
        strategy=resolve_strategy(recipe),
        num_processes=dist.num_processes,
        num_machines=dist.num_machines,
        machine_rank=dist.machine_rank,
        device=device,
        launch_dir=launch_dir(recipe),
    )
    if plan.zero_stage is not None:
        plan.deepspeed = deepspeed_config(recipe, plan.zero_stage, plan.world_size)
    plan.accelerate = accelerate_config(recipe, plan)
    plan.env = launch_env(plan)
    recipe_file = str(plan.launch_dir / "recipe.yaml")
    if plan.world_size == 1:
        plan.command = [sys.executable, "-m", "ftl.train", recipe_file]  # `ftl train` runs it in-process
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(plan.launch_dir / "accelerate.yaml")]
        plan.command = [*launch, "-m", "ftl.train", recipe_file]
    return plan


def launch_dir(recipe: Recipe) -> Path:
    """One directory per machine when there are several: each has its own machine_rank."""
    root = RunDir(Path(recipe.output.dir)).launch  # recipe.yaml, accelerate.yaml, deepspeed.json, plan.json
    dist = recipe.distributed
    return root / f"machine-{dist.machine_rank}" if dist.num_machines > 1 else root


def deepspeed_config(recipe: Recipe, stage: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON for ZeRO ``stage``; the training loop owns accumulation and the LR schedule."""
    train, zero = recipe.train, recipe.distributed.zero
    optimization: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }
    if stage < 3:
        optimization["allgather_bucket_size"] = zero.allgather_bucket_size
    else:
        optimization.update(
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=zero.gather_16bit_weights_on_model_save,
        )
    if zero.offload_optimizer:
        optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero.offload_params:
        optimization["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    precision = train.mixed_precision
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": optimization,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our AdamW (torch's, or DeepSpeed's CPU Adam when offloading) is built by ftl.optim.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def accelerate_config(recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """What ``accelerate launch --config_file`` reads; num_processes there is the total over machines."""
    dist = recipe.distributed
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED" if plan.zero_stage else ("MULTI_GPU" if plan.world_size > 1 else "NO"),
        "num_processes": plan.world_size,
        "num_machines": plan.num_machines,
        "machine_rank": plan.machine_rank,
        "main_process_ip": dist.main_process_ip,
        "main_process_port": dist.main_process_port,
        "rdzv_backend": dist.rdzv_backend,
        "same_network": True,
        "mixed_precision": recipe.train.mixed_precision,
        "use_cpu": False,  # CPU runs are selected by environment, see launch_env
        "gpu_ids": "all",
        "main_training_function": "main",
        "downcast_bf16": "no",
        "debug": False,
    }
    if plan.zero_stage:
        del config["mixed_precision"]  # Accelerate refuses it next to a DeepSpeed JSON, which has it
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(plan.launch_dir / "deepspeed.json"),
            # The default (pdsh) starts only this node's processes with a wrong world view;
            # "standard" is torchrun on every machine, which is what Slurm and users start.
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": False,
        }
    return config


def launch_env(plan: Plan) -> dict[str, str]:
    """Environment for the launched processes, set before torch starts its thread pools."""
    # The CPUs this machine gives us: Slurm's allocation, else this process's affinity.
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)) or 1)
    threads = max(1, cpus // plan.num_processes)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           # A working directory holding folders named like packages (a checkout of ftl has `kernels/`)
           # must not shadow installed ones.
           "PYTHONSAFEPATH": "1"}
    if plan.device == "cpu" and not plan.zero_stage:
        # `accelerate launch --cpu` starts one process whatever --num_processes says; this does not.
        # (DeepSpeed must not see it: Accelerate then turns DeepSpeed off.)
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def write_launch_files(plan: Plan, recipe: Recipe) -> None:
    """Write the resolved recipe, accelerate.yaml, deepspeed.json and plan.json into the run dir."""
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "recipe.yaml": recipe.to_yaml(),
        "accelerate.yaml": yaml.safe_dump(plan.accelerate, sort_keys=False),
        "plan.json": json.dumps({**plan.summary(), "env": plan.env, "command": plan.shell_command()}, indent=2),
    }
    if plan.deepspeed is not None:
        files["deepspeed.json"] = json.dumps(plan.deepspeed, indent=2)
    for name, text in files.items():
        write_atomic(plan.launch_dir / name, text)
