"""The training loop, read top to bottom; its parts are in ``ftl.trainer``.

Run as ``ftl train RECIPE`` or ``python -m ftl.train RECIPE [key=value ...]``, also under an
``accelerate launch`` that the user starts by hand.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ftl.config import Recipe, load_recipe
from ftl.console import setup_logging
from ftl.data import load_source
from ftl.errors import exit_on_user_error, first_line
from ftl.preprocess import prepare as prepare_data
from ftl.launch import LAUNCHED_ENV
from ftl.resume import TrainError, resume_point
from ftl.rundir import RunDir
from ftl.signals import EXIT_STOPPED, StopRequest
from ftl.trainer import RunSummary, Trainer

__all__ = ["TrainError", "main", "preflight", "train"]


def train(recipe: Recipe) -> RunSummary:
    """Train as the recipe says; returns how far it got, its losses and its newest checkpoint."""
    with writer_lock(recipe):
        return _train(recipe)


def writer_lock(recipe: Recipe) -> contextlib.AbstractContextManager:
    """The run directory's lock, taken by the process that writes it: ``ftl train``'s launcher for
    the ranks it starts (on the first machine), else global rank 0."""
    if os.environ.get(LAUNCHED_ENV) or int(os.environ.get("RANK", "0")) != 0 or recipe.distributed.machine_rank != 0:
        return contextlib.nullcontext()
    return RunDir(Path(recipe.output.dir)).lock()


def _train(recipe: Recipe) -> RunSummary:
    trainer = Trainer(recipe)
    state, cfg = trainer.state, trainer.cfg
    trainer.begin()
    with StopRequest() as stop:
        while state.step < state.total_steps:
            result = trainer.step(trainer.next_micro_batches())
            if not result.taken:
                raise trainer.refuse(result)
            last = state.step == state.total_steps
            if state.step % cfg.logging_steps == 0 or last:
                trainer.log(result)
            if trainer.eval_set is not None and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
                state.final_eval_loss = trainer.evaluate()
            reason, timed = stop.agreed(trainer.accelerator, trainer.save_due())
            if (cfg.save_steps and state.step % cfg.save_steps == 0) or timed or last or reason:
                trainer.save()
            if reason and not last:
                trainer.stop(reason)
                break
    return trainer.finish()


def preflight(recipe: Recipe) -> None:
    """What can be checked before processes are started: resume point, run directory, tokenizer,
    model config and the data (tokenized into the cache the ranks then read).

    A problem found by one rank of many surfaces as the other ranks' communication errors; found
    here, it is one line and exit code 2, and the earlier run's files are untouched.
    """
    from transformers import AutoConfig

    from ftl.model import LOAD_ERRORS, ModelError, load_tokenizer

    recipe = recipe.resolved()
    resume_point(recipe)
    tokenizer = load_tokenizer(recipe.model)
    try:
        AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    except LOAD_ERRORS as err:
        raise ModelError(f"model.path: no model config in '{recipe.model.path}': {first_line(err)}") from None
    if recipe.data.streaming:
        for source in recipe.data.train + (recipe.data.eval or []):
            load_source(source, streaming=True)
    else:
        prepare_data(recipe, tokenizer)


def main(argv: list[str] | None = None) -> RunSummary:
    """Entry point for ``python -m ftl.train RECIPE [key=value ...]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m ftl.train RECIPE [key.sub=value ...]")
        sys.exit(0 if args else 2)
    setup_logging(rank=int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))))

    summary = exit_on_user_error(lambda: train(load_recipe(args[0], args[1:])))
    if summary.stopped:
        # Under `ftl train` the launcher reports the stop (75); torchrun's agent would call
        # a non-zero exit a failure and print a traceback for it.
        sys.exit(0 if os.environ.get("FTL_LAUNCHED") else EXIT_STOPPED)
    return summary


if __name__ == "__main__":
    main()
