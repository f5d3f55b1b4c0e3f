"""A sweep directory and the Optuna study in it: the one owner of what a sweep stores.

Layout::

    sweep.json      the sweep file as validated (a later ftl sweep on the directory must match it)
    recipe.yaml     the base recipe, resolved (likewise)
    study.db        the Optuna study (SQLite): trials, their parameters, intermediate and final values
    trials/trial-N/ each trial's run directory (recipe.yaml, sweep_trial.json, checkpoints, metrics)
    best.yaml       the best trial's recipe so far, with the base recipe's output.dir

A trial is told to the study by whoever ran it (:meth:`Sweep.finish`): its value is the best
evaluation of the sweep's metric, which the trainer reported at every evaluation
(``ftl.sweep.report``); a trial the pruner stopped is PRUNED, one whose training failed FAIL.
Samplers are seeded per trial from the sweep's seed and the trials already asked, so a sweep
that was interrupted and resumed asks for the same parameters as one that never was.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftl.checkpoints.rundir import write_atomic
from ftl.recipe.load import apply_override, validate_recipe
from ftl.recipe.schema import Recipe, RecipeError
from ftl.recipe import safe_yaml
from ftl.sweep.spec import SweepError, SweepSpec, override

STUDY = "ftl-sweep"
TRIAL_FILE = "sweep_trial.json"  # in a trial's run directory: the sweep and trial it reports to
LOCAL = "local"  # the owner of trials a local `ftl sweep` runs (a Slurm array task's is its job and task id)


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Sweep:
    root: Path
    spec: SweepSpec
    base: Recipe

    # ------------------------------------------------------------------ the directory

    @classmethod
    def create(cls, root: Path, spec: SweepSpec, base: Recipe) -> Sweep:
        """The sweep directory for ``spec`` on ``base``: new, or an earlier one of the same sweep
        (resumed; ``trials`` and ``parallel`` may differ, which extends or narrows it)."""
        root = Path(root).resolve()
        sweep = cls(root, spec, base.resolved())
        stored = root / "sweep.json"
        if stored.is_file():
            earlier = cls.open(root)
            changed = sorted(k for k in {*spec.identity(), *earlier.spec.identity()}
                             if spec.identity().get(k) != earlier.spec.identity().get(k))
            if changed:
                raise SweepError(f"{root} holds a sweep with other {', '.join(changed)}; give this one its own directory (--dir)")
            if earlier.base.model_dump(mode="json") != sweep.base.model_dump(mode="json"):
                raise SweepError(f"{root} holds a sweep of another recipe (its recipe.yaml differs); give this one its own directory (--dir)")
        elif root.exists() and any(root.iterdir()):
            raise SweepError(f"{root} is not empty and holds no sweep (no sweep.json); give the sweep its own directory (--dir)")
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(stored, json.dumps(spec.model_dump(mode="json"), indent=2))
        write_atomic(root / "recipe.yaml", sweep.base.to_yaml())
        return sweep

    @classmethod
    def open(cls, root: Path) -> Sweep:
        """An existing sweep directory, as it was written by :meth:`create`."""
        root = Path(root).resolve()
        try:
            spec = SweepSpec.model_validate(json.loads((root / "sweep.json").read_text()))
            raw, _ = safe_yaml.parse((root / "recipe.yaml").read_text(), str(root / "recipe.yaml"))
        except FileNotFoundError:
            raise SweepError(f"{root} is not a sweep directory (no sweep.json and recipe.yaml); ftl sweep RECIPE SWEEP.yaml makes one") from None
        return cls(root, spec, validate_recipe(raw, source=str(root / "recipe.yaml")))

    @property
    def database(self) -> Path:
        return self.root / "study.db"

    def trial_dir(self, number: int) -> Path:
        return self.root / "trials" / f"trial-{number}"

    @property
    def best_recipe(self) -> Path:
        return self.root / "best.yaml"

    # ------------------------------------------------------------------ the study

    def study(self, seed: int | None = None, telling: bool = False):
        """The study, with the sweep's sampler (seeded with ``seed``) and pruner. ``telling``: to tell
        a trial's end only, with a plain sampler (the grid sampler's end-of-trial hook would stop an
        ``optimize`` loop, and raises outside one)."""
        optuna = _optuna()
        spec = self.spec
        # SQLite: concurrent array tasks wait for each other's writes instead of failing at once.
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.database}", engine_kwargs={"connect_args": {"timeout": 120}})
        seed = spec.seed if seed is None else seed
        if telling:
            sampler = optuna.samplers.RandomSampler()
        elif spec.sampler.type == "grid":
            sampler = optuna.samplers.GridSampler(spec.search_space(), seed=seed)
        elif spec.sampler.type == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.startup_trials)
        pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.startup_trials,
                                                               n_warmup_steps=spec.pruner.warmup_steps),
                  "hyperband": lambda: optuna.pruners.HyperbandPruner(),
                  "none": lambda: optuna.pruners.NopPruner()}[spec.pruner.type]()
        return optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=STUDY, load_if_exists=True,
                                   direction="minimize" if spec.mode == "min" else "maximize")

    def trials(self) -> list:
        return self.study().get_trials(deepcopy=False)

    def finished(self) -> list:
        return [t for t in self.trials() if t.state.is_finished()]

    def running(self, owner: str) -> list[int]:
        """Trials ``owner`` began and never told: an interrupted local sweep's, a requeued task's."""
        return [t.number for t in self.trials() if t.state.name == "RUNNING" and t.user_attrs.get("owner") == owner]

    def ask(self, owner: str, index: int | None = None) -> int:
        """A new trial with its parameters drawn; returns its number. The sampler is seeded from the
        sweep's seed and ``index``: by default the number of trials before it (a local sweep, so an
        interrupted one draws what an uninterrupted one would), for an array task its place in the
        array (tasks that ask at the same moment draw apart, whatever order they ask in)."""
        index = len(self.trials()) if index is None else index
        study = self.study(seed=(self.spec.seed + 1_000_003 * index) % 2**32)
        trial = study.ask()
        for key, param in self.spec.params.items():
            if isinstance(param, list):
                trial.suggest_categorical(key, param)
            elif param.is_int:
                trial.suggest_int(key, param.low, param.high, step=param.step or 1, log=param.log)
            else:
                trial.suggest_float(key, param.low, param.high, step=param.step, log=param.log)
        trial.set_user_attr("owner", owner)
        return trial.number

    def frozen(self, number: int):
        for trial in self.trials():
            if trial.number == number:
                return trial
        raise SweepError(f"{self.root}: the study has no trial {number}")

    def live(self, number: int, study=None):
        """Trial ``number`` as an Optuna ``Trial`` (to report to, ask to prune, annotate), in any
        process: a trial is owned by the study's storage, not by the process that asked for it."""
        study = study or self.study()
        return _optuna().trial.Trial(study, self.frozen(number)._trial_id)

    def trial_recipe(self, number: int) -> Recipe:
        """The base recipe with trial ``number``'s parameters, in its own run directory; written
        there as ``recipe.yaml`` beside the file that ties the run to its trial."""
        run_dir = self.trial_dir(number)
        recipe = self._with_params(number, {"output.dir": str(run_dir)})
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        write_atomic(run_dir / TRIAL_FILE, json.dumps({"sweep": str(self.root), "trial": number}))
        return recipe

    def _with_params(self, number: int, extra: dict[str, Any] | None = None) -> Recipe:
        """The base recipe with trial ``number``'s parameters (and ``extra`` keys) set, validated."""
        raw = self.base.model_dump(mode="json")
        for key, value in {**self.frozen(number).params, **(extra or {})}.items():
            apply_override(raw, override(key, value))
        try:
            return validate_recipe(raw, source=f"trial {number}")
        except RecipeError as err:
            raise SweepError(f"trial {number}'s parameters do not make a valid recipe: {err.problems[0]}") from None

    def finish(self, number: int, failure: str | None = None):
        """Tell the study how trial ``number`` ended (from what it reported); returns it frozen."""
        optuna = _optuna()
        study, trial = self.study(telling=True), self.frozen(number)
        if trial.state.is_finished():
            return trial
        values = trial.intermediate_values
        if failure is None and not values:
            failure = f"no evaluation reported {self.spec.metric} (set train.eval_steps, and data.eval or data.eval_fraction)"
        if failure is not None:
            self.live(number, study).set_user_attr("failure", failure[:500])
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        elif "pruned_at" in trial.user_attrs:
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(number, best_value(values, self.spec.mode))
        self.write_best()
        return self.frozen(number)

    def best(self):
        done = [t for t in self.trials() if t.state.name == "COMPLETE"]
        if not done:
            return None
        sign = 1 if self.spec.mode == "min" else -1
        return min(done, key=lambda t: (sign * t.value, t.number))

    def write_best(self) -> None:
        best = self.best()
        if best is None:
            return
        recipe = self._with_params(best.number)
        note = (f"# ftl sweep {self.root}: trial {best.number}, {self.spec.metric} {best.value:.6g} (the best of "
                f"{len(self.finished())} finished trials); it trained in {self.trial_dir(best.number)}\n")
        write_atomic(self.best_recipe, note + recipe.to_yaml())


def best_value(values: dict[int, float], mode: str) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return math.inf if mode == "min" else -math.inf
    return min(finite) if mode == "min" else max(finite)


def best_step(values: dict[int, float], mode: str) -> int | None:
    if not values:
        return None
    target = best_value(values, mode)
    return min(s for s, v in values.items() if v == target) if math.isfinite(target) else None


def table_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: what ``ftl sweep --status`` prints (and tests compare)."""
    rows = []
    for t in sweep.trials():
        values = t.intermediate_values
        rows.append({"trial": t.number, "state": t.state.name.lower(), **{k: t.params.get(k) for k in sweep.spec.params},
                     "value": t.value if t.state.name in ("COMPLETE", "PRUNED") else None,
                     "best_step": best_step(values, sweep.spec.mode), "evals": len(values),
                     "pruned_at": t.user_attrs.get("pruned_at"), "failure": t.user_attrs.get("failure"),
                     "owner": t.user_attrs.get("owner")})
    return rows


def owner_of_this_task() -> str:
    """A Slurm array task's owner name: stable across its requeues."""
    return f"slurm:{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
