"""The sweep file (``ftl sweep RECIPE SWEEP.yaml``): which recipe keys to vary over which ranges,
the metric to optimise, how many trials, and the sampler and pruner Optuna searches with.

Example::

    metric: eval_loss          # any metric evaluation logs (ftl.training.early_stopping.eval_metrics)
    mode: min
    trials: 6
    seed: 0
    sampler: {type: tpe, startup_trials: 3}
    pruner: {type: median, startup_trials: 2, warmup_steps: 0}
    parallel: 2                # --slurm: array tasks at once
    params:
      train.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}
      lora.r: [4, 8, 16]       # a list: choices

Every key is checked against the recipe before a trial starts (:func:`check_params`): each bound
and choice is applied to the recipe and validated, so a key that is not a recipe field, or a value
the recipe's rules refuse, is a one-line error at its line of the sweep file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, model_validator

from ftl.errors import UserError
from ftl.recipe import errors as recipe_errors, safe_yaml
from ftl.recipe.schema import RecipeError


class SweepError(UserError):
    """The sweep file or the sweep directory cannot be used as asked."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Range(_Spec):
    """A numeric range: integers when both bounds are integers (``lora.r``), else floats."""

    low: float | int
    high: float | int
    log: bool = Field(False, description="Sample uniformly in log space (learning rates).")
    step: float | int | None = Field(None, gt=0, description="Only low, low+step, ... (not with log).")

    @model_validator(mode="after")
    def _valid(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna samples a stepped range uniformly)")
        if self.is_int and self.step is not None and not isinstance(self.step, int):
            raise ValueError(f"an integer range takes an integer step (got {self.step})")
        return self

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def grid(self) -> list[float | int] | None:
        """The values of a stepped range (what the grid sampler walks), else None."""
        if self.step is None:
            return None if not self.is_int else list(range(self.low, self.high + 1))
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [self.low + i * self.step if self.is_int else round(self.low + i * self.step, 12) for i in range(count)]

    def examples(self) -> list[Any]:
        return [self.low, self.high]


Choices = Annotated[list[Union[bool, int, float, str]], Field(min_length=1)]
# A list is choices, anything else a range: one error per mistake, not one per form it might have been.
Param = Annotated[Union[Annotated[Range, Tag("range")], Annotated[Choices, Tag("choices")]],
                  Discriminator(lambda v: "choices" if isinstance(v, list) else "range")]


class Sampler(_Spec):
    type: Literal["tpe", "random", "grid"] = "tpe"
    startup_trials: int = Field(5, ge=0, le=10**6, description="tpe: random trials before its model takes over.")


class Pruner(_Spec):
    type: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(2, ge=0, le=10**6, description="median: trials that finish before any is pruned.")
    warmup_steps: int = Field(0, ge=0, description="median: no pruning before this optimizer step.")


class SweepSpec(_Spec):
    metric: str = Field("eval_loss", description="The logged eval metric each trial is judged by (its best evaluation).")
    mode: Literal["min", "max"] = "min"
    trials: int | None = Field(None, ge=1, le=100_000, description="Trials to finish (default: 10; grid: the grid's size).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    parallel: int = Field(1, ge=1, le=10_000, description="ftl sweep --slurm: array tasks running at once.")
    params: dict[str, Param] = Field(min_length=1, description="Recipe key (dotted) -> range or choices.")
    _lines: dict = PrivateAttr(default_factory=dict)  # the file's key lines, for check_params' messages

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, raw: Any) -> Any:
        """``sampler: grid`` and ``pruner: none`` stand for ``{type: ...}``."""
        if isinstance(raw, dict):
            raw = {**raw, **{k: {"type": raw[k]} for k in ("sampler", "pruner") if isinstance(raw.get(k), str)}}
        return raw

    @model_validator(mode="after")
    def _grid_is_finite(self) -> SweepSpec:
        if self.sampler.type == "grid":
            endless = [k for k, p in self.params.items() if isinstance(p, Range) and p.grid() is None]
            if endless:
                raise ValueError(f"sampler grid needs choices or a step for every parameter; {', '.join(endless)} has neither")
        return self

    def search_space(self) -> dict[str, list[Any]]:
        """Every parameter's values for the grid sampler."""
        return {k: (p if isinstance(p, list) else p.grid()) for k, p in self.params.items()}

    @property
    def trial_count(self) -> int:
        """Trials to finish: ``trials`` (default 10), at most the grid's size with the grid sampler."""
        if self.sampler.type == "grid":
            grid = math.prod(len(values) for values in self.search_space().values())
            return grid if self.trials is None else min(self.trials, grid)
        return 10 if self.trials is None else self.trials

    def identity(self) -> dict[str, Any]:
        """What a sweep directory was started with and a later ``ftl sweep`` on it must match
        (trials and parallel may grow: that is how a sweep is extended)."""
        return self.model_dump(mode="json", exclude={"trials", "parallel"})


def load_sweep(path: Path) -> SweepSpec:
    """The sweep file, validated; each problem one line at its ``file:line``."""
    try:
        raw, lines = safe_yaml.parse(safe_yaml.read_text(path), str(path))
    except safe_yaml.RecipeYamlError as err:
        raise SweepError(str(err).replace("cannot read recipe", "cannot read sweep file")) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping with params (recipe key -> range or choices), metric, mode, trials")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        errors = [{**e, "loc": tuple(p for p in e["loc"] if p not in ("range", "choices"))} for e in err.errors()]
        raise SweepError("\n".join(recipe_errors.describe(e, str(path), lines, SweepSpec).replace(": (recipe): ", ": ")
                                    for e in errors)) from None
    spec._lines = lines
    return spec


def where(spec: SweepSpec, path: Path, *key: str) -> str:
    """``file:line`` of a key of the sweep file."""
    return recipe_errors.locate(str(path), spec._lines, key)


def override(key: str, value: Any) -> str:
    """``key=value`` as the recipe loader reads an override (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def check_params(spec: SweepSpec, path: Path, try_recipe: Callable[[list[str]], Any]) -> None:
    """Every parameter's bounds and choices make a valid recipe (``try_recipe(overrides)`` loads the
    recipe with them applied); the first problem of each key is reported at its line."""
    problems = []
    for key, param in spec.params.items():
        at = where(spec, path, "params", key)
        for value in (param if isinstance(param, list) else param.examples()):
            try:
                try_recipe([override(key, value)])
            except RecipeError as err:
                problem = err.problems[0].split(": ", 1)[-1]  # (drop the recipe's own location)
                problems.append(f"{at}: params.{key}: {value!r} does not make a valid recipe: {problem}")
                break
    if problems:
        raise SweepError("\n".join(problems))
