"""The process group a plan needs (Accelerate, gloo on CPU), and the guard that checks it.

Launchers fail quietly: ``accelerate launch --cpu`` starts one process whatever
``--num_processes`` says, and ``--multi_gpu`` on a CPU machine starts processes that never talk.
:func:`check_process_group` (and each strategy's ``check_wrapped``, see ``ftl.distributed.strategies``) stop
such a run on every rank with what was expected and what was found.
"""

from __future__ import annotations

import os
from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

from ftl.recipe.schema import Recipe
from ftl.distributed.plan import Plan
from ftl.distributed.strategies import DistributedError, Strategy


def build_accelerator(recipe: Recipe, plan: Plan, strategy: Strategy) -> Accelerator:
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if plan.device == "cuda" else "gloo"
        # gloo on CPU also for DeepSpeed: without it Accelerate sees one process per rank.
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=recipe.distributed.timeout_minutes)))
    deepspeed = DeepSpeedPlugin(hf_ds_config=plan.deepspeed) if plan.deepspeed is not None else None
    return Accelerator(
        cpu=plan.device == "cpu" and deepspeed is None,  # Accelerate turns DeepSpeed off under cpu=True
        mixed_precision=strategy.accelerator_mixed_precision,
        deepspeed_plugin=deepspeed,
        kwargs_handlers=handlers,
    )


def check_process_group(accelerator: Accelerator, plan: Plan, strategy: Strategy) -> None:
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
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" in os.environ and "ACCELERATE_USE_CPU" in os.environ:
        # accelerate launch's simple launcher: asked for several processes (it set a rendezvous) but,
        # without --multi_gpu, it started this one alone, which would train as if it were all of them
        raise DistributedError("distributed: accelerate launch was asked for several processes but started only this one "
                               "(without --multi_gpu it runs a single process); set distributed.num_processes in the recipe "
                               f"and {hint}")
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if strategy.uses_deepspeed != is_deepspeed:
        raise DistributedError(
            f"distributed: the recipe plans {plan.strategy}, but Accelerate runs {accelerator.distributed_type.value}; {hint}"
        )
