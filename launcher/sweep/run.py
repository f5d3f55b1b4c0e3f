"""``ftl sweep``: trials one after another here, or as a Slurm job array; ``--status``: the table.

A local sweep holds the sweep directory's lock, first finishes any trial an earlier local sweep
left running (killed, stopped, preempted: it resumes from its checkpoint like any run), then asks
the study for new trials until ``trials`` have finished. A stop signal stops the trial with a
checkpoint and the sweep with 75; ``ftl sweep`` again resumes both. Each array task of ``--slurm``
asks for (or, requeued, takes back) its own trial in ``ftl.sweep.task``.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ftl.checkpoints.rundir import RunDir
from ftl.console import console
from ftl.errors import UserError
from ftl.recipe.load import load_recipe
from ftl.recipe.schema import Recipe
from ftl.sweep.spec import SweepError, check_params, load_sweep, where
from ftl.sweep.study import LOCAL, Sweep, table_rows
from ftl.training.early_stopping import eval_metrics
from ftl.training.signals import EXIT_STOPPED


def default_dir(recipe: Recipe) -> Path:
    root = Path(recipe.output.dir)
    return root.with_name(root.name + "-sweep")


def prepare(recipe_path: Path, overrides: list[str], sweep_path: Path, directory: Path | None) -> Sweep:
    """The sweep file checked against the recipe (metric, every key and bound), and its directory."""
    spec = load_sweep(sweep_path)
    base = load_recipe(recipe_path, overrides, check_files=True).resolved()
    logged, at = eval_metrics(base), where(spec, sweep_path, "metric")
    if not (base.data.eval or base.data.eval_fraction):
        raise SweepError(f"{at}: metric: the recipe evaluates nothing to judge trials by; set data.eval or data.eval_fraction")
    if spec.metric not in logged:
        raise SweepError(f"{at}: metric: '{spec.metric}' is not logged by this recipe's evaluation; use one of: {', '.join(logged)}")
    if spec.pruner.type != "none" and base.train.eval_steps is None:
        raise SweepError(f"{where(spec, sweep_path, 'pruner')}: pruner: {spec.pruner.type} judges trials between evaluations; "
                         "set train.eval_steps in the recipe (or pruner: none)")
    check_params(spec, sweep_path, lambda extra: load_recipe(recipe_path, [*overrides, *extra]))
    return Sweep.create(directory or default_dir(base), spec, base)


def run_local(sweep: Sweep) -> int:
    """Run the sweep's trials here; returns 75 if a stop signal interrupted it (run again to resume)."""
    target = sweep.spec.trial_count
    with RunDir(sweep.root).lock():
        for number in sweep.running(LOCAL):
            console.print(f"trial {number}: resuming (an earlier ftl sweep left it unfinished)", highlight=False)
            if run_trial(sweep, number) == EXIT_STOPPED:
                return EXIT_STOPPED
        while len(sweep.finished()) < target:
            if run_trial(sweep, sweep.ask(LOCAL)) == EXIT_STOPPED:
                return EXIT_STOPPED
    console.print(status_table(sweep))
    _say_best(sweep)
    return 0


def run_trial(sweep: Sweep, number: int) -> int:
    """Train trial ``number`` and tell the study how it ended; 75 if it was stopped (still running)."""
    from ftl.distributed.launch import train_or_launch

    recipe = sweep.trial_recipe(number)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sweep.frozen(number).params.items())
    console.print(f"[bold]trial {number}[/] ({escape(shown)}) in {escape(str(sweep.trial_dir(number)))}", markup=True, highlight=False)
    import torch

    try:
        code, _ = train_or_launch(recipe)
    except (UserError, torch.OutOfMemoryError) as err:  # a diverging rate, a batch too big: the trial failed, the sweep goes on
        reason = str(err).splitlines()[0] if isinstance(err, UserError) else "out of memory (torch.OutOfMemoryError)"
        sweep.finish(number, failure=reason)
        console.print(f"trial {number}: [red]failed[/]: {escape(reason)}", markup=True, highlight=False)
        if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return 0
    if code == EXIT_STOPPED:
        console.print(f"trial {number} stopped with a checkpoint; run the same ftl sweep to resume it", highlight=False)
        return code
    trial = sweep.finish(number, failure=None if code == 0 else f"training exited with status {code}")
    value = f"{trial.value:.6g}" if trial.value is not None else "-"
    console.print(f"trial {number}: {trial.state.name.lower()}, {sweep.spec.metric} {value}", highlight=False)
    return 0


def status_table(sweep: Sweep) -> Table:
    spec = sweep.spec
    table = Table(title=f"sweep {sweep.root} ({spec.metric}, {spec.mode}; {len(sweep.finished())} of {spec.trial_count} finished)",
                  title_justify="left")
    short = [key.rsplit(".", 1)[-1] for key in spec.params]
    names = [s if short.count(s) == 1 else key for s, key in zip(short, spec.params)]
    for column in ["trial", "state", *names, spec.metric, "best step", "evals", "note"]:
        note = column == "note"  # (a failure's reason, cut short: the full one is in the trial's log)
        table.add_column(column, justify="left" if note or column == "state" else "right", no_wrap=True,
                         overflow="ellipsis", max_width=24 if note else None)
    best = sweep.best()
    for row in table_rows(sweep):
        note = (f"at step {row['pruned_at']}" if row["pruned_at"] is not None else row["failure"] or "")
        if best is not None and row["trial"] == best.number:
            note = "best"
        table.add_row(str(row["trial"]), row["state"], *[_shown(row[k]) for k in spec.params],
                      _shown(row["value"]), _shown(row["best_step"]), str(row["evals"]), escape(note[:80]))
    return table


def _shown(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _say_best(sweep: Sweep) -> None:
    best = sweep.best()
    if best is None:
        console.print("no trial has completed yet")
        return
    console.print(f"best: trial {best.number}, {sweep.spec.metric} {best.value:.6g}; its recipe: "
                  f"{escape(str(sweep.best_recipe))} (trained in {escape(str(sweep.trial_dir(best.number)))})",
                  highlight=False)


def show_status(sweep: Sweep) -> int:
    console.print(status_table(sweep))
    _say_best(sweep)
    return 0
