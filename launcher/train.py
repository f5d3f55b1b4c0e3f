"""The training loop, read top to bottom; its parts are in ``ftl.training.trainer``.

Run as ``ftl train RECIPE`` or ``python -m ftl.train RECIPE [key=value ...]``, also under an
``accelerate launch`` that the user starts by hand.
"""

from __future__ import annotations

import os
import sys

from ftl.recipe.schema import Recipe
from ftl.recipe.load import load_recipe
from ftl.console import setup_logging
from ftl.errors import exit_on_user_error
from ftl.distributed.preflight import writer_lock
from ftl.training.early_stopping import NOTHING
from ftl.training.resume import TrainError
from ftl.training.signals import EXIT_STOPPED, StopRequest
from ftl.training.trainer import RunSummary, Trainer

__all__ = ["TrainError", "main", "train"]


def train(recipe: Recipe) -> RunSummary:
    """Train as the recipe says; returns how far it got, its losses and its newest checkpoint."""
    with writer_lock(recipe):
        return _train(recipe)


def _train(recipe: Recipe) -> RunSummary:
    trainer = Trainer(recipe)
    state, cfg = trainer.state, trainer.cfg
    trainer.begin()
    with StopRequest() as stop:
        while state.step < state.total_steps and not state.finished_early:
            result = trainer.step(trainer.next_micro_batches())
            if not result.taken:
                raise trainer.refuse(result)
            last = state.step == state.total_steps
            if state.step % cfg.logging_steps == 0 or last:
                trainer.log(result)
            verdict = NOTHING
            if trainer.eval_sets and ((cfg.eval_steps and state.step % cfg.eval_steps == 0) or last):
                metrics = trainer.evaluate()
                state.final_eval_loss = metrics["eval_loss"]
                verdict = trainer.judge(metrics)
            reason, timed = stop.agreed(trainer.accelerator, trainer.save_due())
            if (cfg.save_steps and state.step % cfg.save_steps == 0) or timed or last or reason or verdict.improved or verdict.stop:
                trainer.save(best=verdict.improved)
            if reason and not last and not verdict.stop:
                trainer.stop(reason)
                break
    return trainer.finish()


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
