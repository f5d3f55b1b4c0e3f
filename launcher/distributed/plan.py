"""How a recipe runs: strategy, world size, DeepSpeed JSON, Accelerate config and launch command.

The plan is a pure function of the recipe (and whether this machine has CUDA), so ``ftl plan``
prints exactly what ``ftl train`` launches, and every rank recomputes it to check that the
process group it finds is the one the recipe asked for (see ``ftl.distributed.process_group``). The strategy
(``Recipe.strategy`` resolves ``auto``) writes its own part of the launch files.
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

from ftl.distributed import strategies
from ftl.recipe.schema import Recipe
from ftl.checkpoints.rundir import RunDir, write_atomic

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


def local_device() -> str:
    """The device this machine trains on."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_plan(recipe: Recipe, device: str | None = None) -> Plan:
    """The plan for ``recipe`` (resolve paths first: every rank must read the same files)."""
    dist = recipe.distributed
    device = device or local_device()
    strategy = strategies.for_recipe(recipe)
    plan = Plan(
        strategy=strategy.name,
        num_processes=dist.num_processes,
        num_machines=dist.num_machines,
        machine_rank=dist.machine_rank,
        device=device,
        launch_dir=launch_dir(recipe),
    )
    plan.deepspeed = strategy.deepspeed_config(device)
    plan.accelerate = strategy.accelerate_config(accelerate_config(recipe, plan), plan.launch_dir)
    plan.env = {**launch_env(plan), **strategy.launch_env(device)}
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


def accelerate_config(recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """What ``accelerate launch --config_file`` reads (the strategy adds its part); num_processes
    there is the total over machines."""
    dist = recipe.distributed
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
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
