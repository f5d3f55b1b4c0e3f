"""Scorers of generated answers: what ``eval.generate`` logs during training and ``ftl eval`` reports.

Eval loss says the model got closer to the references; a scorer says whether what it generates is
right. Built-ins need no code; a user scorer is ``module:function`` with TRL's reward-function
shape: called with ``prompts``, ``completions`` and ``answers`` (lists of the same length, keyword
arguments) and returning one float per row. Every scorer's mean over the rows is the metric.

- ``exact_match``: the stripped completion equals the stripped answer
- ``contains``: the stripped answer occurs in the completion
- ``json_valid``: the completion parses as JSON
- ``json_fields``: the share of the answer's JSON object fields the completion's JSON object has equal
- ``regex:PATTERN``: the completion contains a match of PATTERN (metric ``regex``)
"""

from __future__ import annotations

import importlib
import json
import math
import re
from typing import Any, Callable

from ftl.errors import UserError

Scorer = Callable[[list[str], list[str], list[str]], list[float]]


class ScorerError(UserError):
    """A scorer that cannot be found or returned what is not a score; the message names it."""


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_fields(completion: str, answer: str) -> float:
    want, got = _parse(answer.strip()), _parse(completion.strip())
    if not isinstance(want, dict) or not want:
        return float(got == want and got is not None)
    if not isinstance(got, dict):
        return 0.0
    return sum(got.get(key) == value for key, value in want.items()) / len(want)


BUILT_IN: dict[str, Callable[[str, str], float]] = {
    "exact_match": lambda completion, answer: float(completion.strip() == answer.strip()),
    "contains": lambda completion, answer: float(answer.strip() in completion),
    "json_valid": lambda completion, answer: float(_parse(completion.strip()) is not None),
    "json_fields": _json_fields,
}


def metric_name(spec: str) -> str:
    """The metric a scorer is logged as: its name, ``regex``, or a user function's name."""
    if spec.startswith("regex:"):
        return "regex"
    return spec.rsplit(":", 1)[-1] if ":" in spec else spec


def check(spec: str) -> str | None:
    """What is wrong with a scorer name, before any model loads (None: nothing)."""
    if spec in BUILT_IN:
        return None
    if spec.startswith("regex:"):
        try:
            re.compile(spec[6:])
        except re.error as err:
            return f"'{spec}': not a regular expression ({err})"
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        return (f"'{spec}': not a scorer; use one of {', '.join(BUILT_IN)}, regex:PATTERN, or module:function "
                "(an importable module)")
    return None


def build(spec: str) -> Scorer:
    """The scorer a name stands for: every row's score."""
    if spec in BUILT_IN:
        fn = BUILT_IN[spec]
        return lambda prompts, completions, answers: [fn(c, a) for c, a in zip(completions, answers)]
    if spec.startswith("regex:"):
        pattern = re.compile(spec[6:])
        return lambda prompts, completions, answers: [float(pattern.search(c) is not None) for c in completions]
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ScorerError(f"scorer {spec}: cannot import it ({err}); the module must be importable where ftl runs") from None
    return fn


def score(specs: list[str], prompts: list[str], completions: list[str], answers: list[str]) -> dict[str, list[float]]:
    """Every scorer's score of every row, checked: one float per row, finite."""
    found = {}
    for spec in specs:
        try:
            values = build(spec)(prompts=prompts, completions=completions, answers=answers)
        except ScorerError:
            raise
        except Exception as err:  # a user's function: its failure, named, not a traceback from the loop
            raise ScorerError(f"scorer {spec}: raised {type(err).__name__}: {err}") from None
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise ScorerError(f"scorer {spec}: returned {len(values)} scores for {len(completions)} rows")
        for row, value in enumerate(values):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScorerError(f"scorer {spec}: row {row}: {value!r} is not a finite number")
        found[metric_name(spec)] = [float(v) for v in values]
    return found
