"""The chat template an export ships: the one the model was trained with.

A serving engine's chat API renders every request with the export's chat template. For ``chat`` and
``sharegpt`` data that is the tokenizer's own template, which ftl trained with. For ``alpaca`` and
``completion`` data the tokenizer's template (often the base's ChatML) is not what the model saw, so
the export gets a template that renders the training prompt: the alpaca prompt around the user's
message (the same text ``ftl.data.sources`` renders), or the plain text for completion data; BOS where the
tokenizer added it in training, and each reply closed by EOS where ``data.add_eos`` trained it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ftl.recipe.schema import Recipe
from ftl.data.formats import FORMATS, names

log = logging.getLogger(__name__)

CHAT_FORMATS = set(names(lambda f: f.conversation))


def trained_chat_template(tokenizer: Any, recipe: Recipe) -> tuple[str | None, str]:
    """(the template to ship, or None to keep the tokenizer's; where it comes from, for the model card)."""
    formats = {source.format for source in recipe.data.train}
    if formats <= CHAT_FORMATS:
        return None, "the tokenizer's own (the run trained on conversations rendered with it)"
    if len(formats) > 1:
        log.warning("the run mixes data formats (%s): the export keeps the tokenizer's chat template, which renders only "
                    "the chat rows as trained", ", ".join(sorted(formats)))
        return None, f"the tokenizer's own (the run mixed {', '.join(sorted(formats))} data; it renders the chat rows as trained)"
    (fmt,) = formats
    adds_bos = tokenizer.bos_token is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    eos = recipe.data.add_eos and tokenizer.eos_token is not None
    prompt = FORMATS[fmt].prompt
    if prompt is not None:
        before, after = prompt.split("{instruction}")
        user = f"{json.dumps(before)} + message['content'] + {json.dumps(after)}"
        origin = f"{fmt}: the training prompt around the user's message (no input field)"
    else:
        user = "message['content']"
        origin = "completion: the messages' text as one document, as trained"
    return _template(user, adds_bos, eos), origin


def _template(user: str, bos: bool, eos: bool) -> str:
    """System messages are refused: the training prompt had no place for one."""
    return (
        ("{{- bos_token }}" if bos else "")
        + "{%- for message in messages %}"
        + "{%- if message['role'] == 'user' %}{{- " + user + " }}"
        + "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}" + ("{{- eos_token }}" if eos else "")
        + "{%- else %}{{- raise_exception('this model was trained without ' + message['role'] + ' messages') }}"
        + "{%- endif %}{%- endfor %}"
    )
