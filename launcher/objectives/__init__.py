"""Objectives: what a run trains the model to do (``method.objective``), one class each.

``method.objective`` is resolved once to a class (:func:`for_recipe`); the rules, the planner and
the trainer ask that class, never the objective's name. Adding an objective is one module here
(a subclass of :class:`~ftl.objectives.base.Objective` and its batch), one entry in ``OBJECTIVES``
and, if it reads new kinds of rows, one data format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ftl.objectives.base import Objective, Problems
from ftl.objectives.kto import KTO
from ftl.objectives.preference import DPO, IPO, ORPO, SimPO
from ftl.objectives.reward import Reward
from ftl.objectives.sft import SFT

if TYPE_CHECKING:
    from ftl.recipe.schema import Recipe

SECTIONS = ("preference", "kto", "reward")  # the recipe's sections of objective settings
# The order is the one error messages list them in.
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (SFT, KTO, DPO, IPO, SimPO, ORPO, Reward)}


def for_recipe(recipe: Recipe) -> type[Objective]:
    return OBJECTIVES[recipe.method.objective]


def build(recipe: Recipe, pad_token_id: int, fused: Callable | None = None, reference: torch.nn.Module | None = None) -> Objective:
    return for_recipe(recipe)(recipe, pad_token_id, fused, reference)


def default_for(data_format: str) -> type[Objective]:
    """The objective a starter recipe trains rows of ``data_format`` with (the first that accepts them)."""
    return next(cls for cls in OBJECTIVES.values() if data_format in cls.formats)


def _names(accepts: Callable[[type[Objective]], bool]) -> str:
    return " or ".join(name for name, cls in OBJECTIVES.items() if accepts(cls))


def check(recipe: Recipe) -> Problems:
    """The objective's rules: the data formats it trains on, the preference keys it reads, what it
    cannot do yet (streaming, the fused loss kernel), and its own (``Objective.check``)."""
    cls, data = for_recipe(recipe), recipe.data
    name = cls.name
    problems: Problems = []
    for section in SECTIONS:
        values = getattr(recipe, section)
        defaults = type(values)()
        for key in type(values).model_fields:
            dotted = f"{section}.{key}"
            if getattr(values, key) != getattr(defaults, key) and dotted not in cls.settings:
                problems.append(((section, key), f"applies to method.objective {_names(lambda c: dotted in c.settings)}, not {name}"))
    for key, source in data.source_keys():
        if source.format in cls.formats:
            continue
        others = _names(lambda c: source.format in c.formats)
        if cls.formats == SFT.formats:
            problems.append((("data", *key, "format"), f"{source.format} rows need method.objective {others}"))
        else:
            problems.append((("data", *key, "format"), f"method.objective {name} trains on {' or '.join(cls.formats)} "
                             f"rows: use format: {' or '.join(cls.formats)} (see the README's data formats)"))
    if data.invalid_pairs != "error" and "preference" not in cls.formats:
        problems.append((("data", "invalid_pairs"), f"applies to preference data (method.objective "
                         f"{_names(lambda c: 'preference' in c.formats)})"))
    if cls is not SFT and data.streaming:
        problems.append((("data", "streaming"), f"not available with method.objective {name} yet; preprocess instead"))
    if not cls.fused_ce and isinstance(recipe.kernels, list) and "fused_ce" in recipe.kernels:
        problems.append((("kernels",), f"fused_ce computes a summed loss; method.objective {name} needs per-sequence "
                         "log-probabilities: remove fused_ce"))
    for section in [s for s in SECTIONS if any(c.reference_section == s for c in OBJECTIVES.values())]:
        if getattr(recipe, section).reference == "model" and recipe.method.type != "full":
            problems.append(((section, "reference"), "LoRA and QLoRA use the base model with the adapter disabled as the "
                             "reference; a frozen copy (model) is for method.type: full"))
    return problems + cls.check(recipe)
