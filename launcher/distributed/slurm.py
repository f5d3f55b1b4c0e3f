"""Slurm: an sbatch script generated from the recipe, submitted with ``sbatch``.

The script (``slurm/train.sbatch.j2``) runs one task per node; each runs ``ftl train`` with the
node's ``machine_rank`` and the first node as rendezvous, so each node starts its own processes
exactly as on a single machine. ``--signal=B:USR1@grace`` warns the batch shell before the time
limit; it forwards the signal to the training step, which checkpoints and exits with 75, and the
script requeues the job (up to ``max_restarts``), which resumes from ``latest``. Every value from
the recipe that reaches the script is checked in :func:`render` (no control characters; the
schema, which render re-applies, admits only variable names as ``slurm.env`` keys) and quoted by
:func:`shell_quote`, so no recipe value can run as a command;
``slurm.setup`` lines are the one exception, by design: they are shell lines the recipe's author writes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from ftl.recipe.schema import CONTROL_CHARS, Recipe
from ftl.errors import UserError
from ftl.checkpoints.rundir import RunDir, write_atomic

if TYPE_CHECKING:
    from ftl.sweep.study import Sweep

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"


class SlurmError(UserError):
    """The job cannot be rendered or submitted."""


def render(recipe: Recipe, mode: str = "train", sweep: Sweep | None = None, tasks: int = 0, first: int = 0) -> str:
    """The sbatch script for ``recipe`` (``mode``: train, export after training, or ``trial``: a job
    array of ``tasks`` trials of ``sweep``, each task training the trial the study gives it)."""
    recipe = recipe.resolved()
    slurm = recipe.slurm
    run = RunDir(Path(recipe.output.dir) if sweep is None else sweep.root)
    values = slurm.model_dump()
    values.update(sweep_dir=str(sweep.root) if sweep else "", tasks=tasks, first=first, parallel=sweep.spec.parallel if sweep else 1)
    if mode == "export":
        values.update(nodes=1, job_name=f"{slurm.job_name}-export", gpus_per_node=min(slurm.gpus_per_node or 0, 1) or None)
    values.update(
        mode=mode,
        # The submitting machine's interpreter, unless the job sets up its own environment (a venv or
        # conda activated, modules loaded, a container): then the python that environment puts first.
        python="python3" if slurm.setup or slurm.container_image else sys.executable,
        recipe_file=str(run.slurm / "recipe.yaml"),
        run_dir=str(run.root),
        stopped=str(run.stopped),
        log_dir=slurm.output_dir or str(run.slurm),
    )
    # Every value that reaches the script is checked here, named by where it came from, before
    # anything is rendered: a newline would end a comment or #SBATCH line and start a command.
    names = {"sweep_dir": "the sweep directory", "run_dir": "output.dir", "recipe_file": "output.dir", "stopped": "output.dir", "log_dir": "slurm.output_dir" if slurm.output_dir else "output.dir",
             "python": "the Python interpreter path"}
    for key, value in values.items():
        _check_safe(value, names.get(key, f"slurm.{key}"))
    container = ""
    if slurm.container_image:
        container = f"--container-image={shell_quote(slurm.container_image)} "
        if slurm.container_mounts:
            container += f"--container-mounts={shell_quote(slurm.container_mounts)} "
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["q"] = shell_quote
    return env.get_template("train.sbatch.j2").render(**values, container=container)


def shell_quote(value: object) -> str:
    """The one way a user value enters the script: one shell word, never a line break."""
    text = str(value)
    if CONTROL_CHARS.search(text):  # render() names the field first; this is the backstop
        raise SlurmError(f"{text[:40]!r}: control characters are not allowed in values rendered into the Slurm script")
    return shlex.quote(text)


def _check_safe(values: object, path: str) -> None:
    if isinstance(values, dict):
        for key, value in values.items():
            _check_safe(key, path)
            _check_safe(value, f"{path}.{key}")
    elif isinstance(values, list):
        for i, value in enumerate(values):
            _check_safe(value, f"{path}[{i}]")
    elif isinstance(values, str) and CONTROL_CHARS.search(values):
        raise SlurmError(f"{path}: control characters (newlines, tabs) are not allowed in values rendered into the Slurm script")


def submit(recipe: Recipe, export: bool = False, dependency: str | None = None, dry_run: bool = False) -> list[str]:
    """Write the script(s) into ``<run dir>/slurm/`` and sbatch them; returns the job ids (``dry_run``:
    the sbatch commands, submitting nothing)."""
    job = recipe.resolved()
    directory = RunDir(Path(job.output.dir)).slurm
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "recipe.yaml", job.to_yaml())
    (Path(job.slurm.output_dir) if job.slurm.output_dir else directory).mkdir(parents=True, exist_ok=True)
    scripts = [("train", dependency)]
    ids: list[str] = []
    for mode, after in scripts + ([("export", None)] if export else []):
        path = directory / f"{mode}.sbatch"
        write_atomic(path, render(recipe, mode))
        if mode == "export":
            after = f"afterok:{ids[0]}" if not dry_run else "afterok:<the training job's id>"
        ids.append(shlex.join(_sbatch_command(path, after)) if dry_run else _sbatch(path, after))
    return ids


def _sbatch_command(script: Path, dependency: str | None) -> list[str]:
    return ["sbatch", "--parsable"] + ([f"--dependency={dependency}"] if dependency else []) + [str(script)]


def _sbatch(script: Path, dependency: str | None) -> str:
    command = _sbatch_command(script, dependency)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run `ftl slurm submit` on a Slurm login node (or `ftl slurm render` to see the script)") from None
    if result.returncode != 0:
        raise SlurmError(f"sbatch {script.name} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return result.stdout.strip().split(";")[0]
