"""Finding a model's files and loading its tokenizer, without the modeling stack.

The launcher process checks the model path and tokenizes the data before it starts the ranks; this
module lets it do that with transformers' tokenizers alone (importing the model classes costs
seconds that every launch would pay again in each rank).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from ftl.recipe.schema import ModelSection
from ftl.errors import UserError, first_line
from ftl.models.families import PAD_CANDIDATES

log = logging.getLogger(__name__)


class ModelError(UserError):
    """The model or tokenizer cannot be loaded as the recipe asks; the message says why."""


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    # What loading a damaged or mismatched model directory raises, besides missing files: torn or
    # empty safetensors, weights of the wrong shape, a config missing fields, broken tokenizer JSON.
    return (OSError, ValueError, ImportError, KeyError, TypeError, RuntimeError, SafetensorError)


LOAD_ERRORS = _load_errors()


def looks_local(path: str) -> bool:
    """A path meant as a directory on this machine, not a hub id ('org/name')."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()


def check_local(path: str, field: str) -> None:
    """A local path that is missing is reported now, not as a bad hub id after a minute of network retries."""
    if looks_local(path) and not Path(path).expanduser().exists():
        raise ModelError(f"{field}: {path} does not exist (a local path; hub ids look like org/name)")


def load_tokenizer(cfg: ModelSection) -> Any:
    source = cfg.tokenizer or cfg.path
    check_local(source, "model.tokenizer" if cfg.tokenizer else "model.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except LOAD_ERRORS as err:
        raise ModelError(f"model.tokenizer: cannot load a tokenizer from '{source}': {first_line(err)}") from None
    set_pad_token(tokenizer)
    return tokenizer


def set_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one that is not EOS where its vocabulary has one.

    Padding is masked out of attention and loss, so any token would do for ftl; but a pad equal to
    EOS makes collators and inference code that mask by pad id also mask EOS (the model never learns
    to stop), the best-known way Llama 3 fine-tunes break.
    """
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    choice = next((t for t in PAD_CANDIDATES if t in vocab), None)
    if choice is None and tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        choice = tokenizer.unk_token
    if choice is None and tokenizer.eos_token is None:
        raise ModelError(f"model.tokenizer: the tokenizer of {tokenizer.name_or_path} has no pad, EOS or unknown token, so "
                         "batches cannot be padded nor sequences ended; set eos_token (and pad_token) in its "
                         "tokenizer_config.json")
    if choice is None:
        choice = tokenizer.eos_token
        log.warning("tokenizer has no pad token and no unused token to pad with; padding with EOS %r (ftl masks "
                    "padding by position, so training is unaffected)", choice)
    else:
        log.warning("tokenizer has no pad token; padding with %r (id %d), not EOS", choice, vocab[choice])
    tokenizer.pad_token = choice
