"""Early stopping and the best checkpoint (``train.early_stopping``).

A small task set overfits: the eval metric bottoms out and climbs while the train loss keeps
falling, and the last checkpoint is then not the one to keep. With ``train.early_stopping`` every
evaluation is judged against the best so far: an improvement (by more than ``min_delta``) is saved
as a checkpoint and recorded as ``checkpoints/best``, which ``output.keep_last`` never prunes and
``ftl export RUN --best`` exports; ``patience`` evaluations in a row without one stop the run, with
a final checkpoint. The judge's memory (best value and step, evaluations since) is part of the
``TrainState``, so a stopped, requeued or resumed run judges exactly as one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftl.scorers import metric_name

if TYPE_CHECKING:
    from ftl.recipe.schema import EarlyStoppingSection, Recipe
    from ftl.training.state import TrainState


def eval_metrics(recipe: Recipe) -> list[str]:
    """What Trainer.evaluate logs for this recipe's eval sets, and so what a run can stop on."""
    data = recipe.data
    found = ["eval_loss"]
    if data.named_eval:
        found += [data.metric_prefix(name) + what for name in data.eval_sets() for what in ("loss", "vs_base")]
    gen = recipe.eval.generate
    if gen is not None:
        found += [data.metric_prefix(gen.set) + metric_name(spec) for spec in gen.scorers]
    return found


@dataclass(frozen=True)
class Verdict:
    improved: bool = False  # a new best: save it and point checkpoints/best at it
    stop: bool = False  # patience is spent: save and stop


NOTHING = Verdict()


def check(recipe: Recipe) -> list[tuple[tuple, str]]:
    """The recipe rules of ``train.early_stopping``: something to evaluate, and a metric evaluation logs."""
    section, train = recipe.train.early_stopping, recipe.train
    if section is None:
        return []
    problems = []
    if not (recipe.data.eval or recipe.data.eval_fraction):
        problems.append((("train", "early_stopping"), "needs an eval set to judge: set data.eval or data.eval_fraction"))
    if train.eval_steps is None:
        problems.append((("train", "early_stopping"), "needs train.eval_steps (how often to evaluate, e.g. 50)"))
    if section.metric not in eval_metrics(recipe):
        problems.append((("train", "early_stopping", "metric"), f"'{section.metric}' is not logged by evaluation; "
                         f"use one of: {', '.join(eval_metrics(recipe))}"))
    return problems


def judge(section: EarlyStoppingSection | None, state: TrainState, metrics: dict[str, float]) -> Verdict:
    """Compare this evaluation with the best so far; updates ``state`` (the same on every rank,
    whose metrics are reduced over all of them)."""
    if section is None:
        return NOTHING
    value = metrics[section.metric]
    better = state.best_metric is None or (value < state.best_metric - section.min_delta if section.mode == "min"
                                           else value > state.best_metric + section.min_delta)
    if better:
        state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
        return Verdict(improved=True)
    state.evals_since_best += 1
    if state.evals_since_best >= section.patience:
        state.early_stopped = True
        return Verdict(stop=True)
    return NOTHING
