"""The trainer's side of a sweep: a run directory that holds ``sweep_trial.json`` is a trial, and
each of its evaluations is reported to the study, whose pruner may stop it.

Only the main process talks to the study; the trainer shares its answer with every rank. A
resumed trial reports again the evaluations it repeats (their values are the same: resume is
exact), which are already in the study and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftl.errors import UserError, first_line
from ftl.sweep.study import TRIAL_FILE, Sweep

def is_trial(run_dir: Path) -> bool:
    return (Path(run_dir) / TRIAL_FILE).is_file()


class TrialLink:
    def __init__(self, sweep: Sweep, number: int):
        self.sweep, self.number = sweep, number
        self.metric = sweep.spec.metric

    @classmethod
    def of_run(cls, run_dir: Path) -> TrialLink | None:
        path = Path(run_dir) / TRIAL_FILE
        if not path.is_file():
            return None
        try:
            ties = json.loads(path.read_text())
            return cls(Sweep.open(Path(ties["sweep"])), int(ties["trial"]))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a sweep trial's file ({first_line(err)}); delete it to train the run on its own") from None

    def report(self, step: int, metrics: dict[str, float]) -> bool:
        """Report this evaluation; whether the pruner stops the trial here."""
        value = metrics.get(self.metric)
        if value is None:
            raise UserError(f"sweep metric {self.metric} was not logged by this evaluation; logged: {', '.join(metrics)}")
        try:
            frozen = self.sweep.frozen(self.number)
            if frozen.state.is_finished():  # the sweep has told it (the run trained on by hand since)
                return False
            trial = self.sweep.live(self.number)
            if step not in frozen.intermediate_values:
                trial.report(value, step)
            pruned = trial.should_prune()
            if pruned:
                trial.set_user_attr("pruned_at", step)
        except UserError:
            raise
        except Exception as err:  # the study's storage: a locked, moved or damaged study.db
            raise UserError(f"sweep {self.sweep.root}: cannot report trial {self.number} to {self.sweep.database}: {first_line(err)}") from None
        return pruned
