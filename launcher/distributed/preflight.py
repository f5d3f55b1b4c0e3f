"""What ``ftl train`` does before it starts processes: take the run directory's lock and check
everything one process can check (resume point, tokenizer, model config, data).

A problem found by one rank of many surfaces as the other ranks' communication errors; found here,
it is one line and exit code 2. This module imports no model code, so the launcher process
starts in the time a tokenizer takes to load, not the whole training stack's.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from transformers import AutoConfig

from ftl.recipe.schema import Recipe
from ftl.data.sources import load_source
from ftl.errors import first_line
from ftl.distributed.launch import LAUNCHED_ENV
from ftl.data.preprocess import prepare as prepare_data
from ftl.training.resume import resume_point
from ftl.checkpoints.rundir import RunDir
from ftl.models.tokenizer import LOAD_ERRORS, ModelError, load_tokenizer


def writer_lock(recipe: Recipe) -> contextlib.AbstractContextManager:
    """The run directory's lock, taken by the process that writes it: ``ftl train``'s launcher for
    the ranks it starts (on the first machine), else global rank 0."""
    if os.environ.get(LAUNCHED_ENV) or int(os.environ.get("RANK", "0")) != 0 or recipe.distributed.machine_rank != 0:
        return contextlib.nullcontext()
    return RunDir(Path(recipe.output.dir)).lock()


def preflight(recipe: Recipe) -> None:
    """What can be checked before processes are started: resume point, run directory, tokenizer,
    model config and the data (tokenized into the cache the ranks then read). A failure leaves the
    earlier run's files untouched."""
    recipe = recipe.resolved()
    resume_point(recipe)
    tokenizer = load_tokenizer(recipe.model)
    try:
        AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    except LOAD_ERRORS as err:
        raise ModelError(f"model.path: no model config in '{recipe.model.path}': {first_line(err)}") from None
    if recipe.data.streaming:
        for source in recipe.data.train + recipe.data.eval_sources():
            load_source(source, streaming=True)
    else:
        prepare_data(recipe, tokenizer)
