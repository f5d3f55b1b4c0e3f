"""Distributed strategies as objects: each decides everything about itself.

A strategy owns, for the run it is built for: its rules (which recipe settings it cannot run),
its terms of the memory estimate (what it divides by the world size, what it offloads), its
launch files (the Accelerate config, DeepSpeed's JSON, the environment), how the model is
wrapped and checked, the three places where a training step differs (skipping gradient sync,
backward, the optimizer step), mixed precision, and its checkpoint format. Nothing outside this
package tells strategies or engines apart; :attr:`ftl.recipe.schema.Recipe.strategy` decides once which
one a recipe runs (``auto`` included). Adding a strategy means adding one class here and its tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftl.distributed.strategies.base import CheckpointError, CheckpointFormatError, DistributedError, Single, Strategy, is_peft
from ftl.distributed.strategies.ddp import DDP
from ftl.distributed.strategies.fsdp2 import FSDP2
from ftl.distributed.strategies.zero import Zero

if TYPE_CHECKING:
    from ftl.recipe.schema import Recipe

STRATEGIES: dict[str, type[Strategy]] = {"single": Single, "ddp": DDP, "zero1": Zero, "zero2": Zero, "zero3": Zero, "fsdp2": FSDP2}


def build(name: str, recipe: Recipe) -> Strategy:
    """The strategy ``name`` for ``recipe`` (also to try one that ``auto`` did not pick)."""
    return STRATEGIES[name](name, recipe)


def for_recipe(recipe: Recipe) -> Strategy:
    """The strategy the recipe runs."""
    return build(recipe.strategy, recipe)


__all__ = ["CheckpointError", "CheckpointFormatError", "DDP", "DistributedError", "FSDP2", "STRATEGIES", "Single", "Strategy", "Zero",
           "build", "for_recipe", "is_peft"]
