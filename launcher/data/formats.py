"""Data formats: one entry each, and everything the rest of ftl asks of a format.

A format names the fields of its rows, the field that gives it away in a file's first row (``ftl
init``, ``ftl eval`` without ``--format``), whether its rows are conversations rendered by the
tokenizer's chat template, whether its rows hold prompts with reference answers (exact match), and
how a row is tokenized; a format whose rows need the whole set (KTO's mismatched pairs) finishes the
tokenized set. Which objectives train on a format is each objective's ``formats`` (``ftl.objectives``).
Adding a format is one module that tokenizes its rows and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ftl.data.chat import tokenize_chat_row
from ftl.data.pairs import tokenize_pair
from ftl.data.text import ALPACA_PROMPT, tokenize_alpaca, tokenize_completion
from ftl.data.unpaired import tokenize_unpaired, with_mismatched


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]
    marker: str  # a first row with this field is of this format
    tokenize: Callable[..., dict[str, Any]]  # (row, source, tokenizer, cfg, where) -> the tokenized row
    conversation: bool = False  # rendered by the tokenizer's chat template (chat masking keys apply)
    answers: bool = False  # prompts with reference answers: exact match (`ftl eval`), `ftl generate --data`
    pairs: bool = False  # a chosen and a rejected response per prompt
    prompt: str | None = None  # the fixed prompt text is rendered in (alpaca), for the exported chat template
    finish: Callable[[Any, int], Any] | None = None  # (tokenized set, max_length) -> the set, once all rows are in


# In the order a first row is recognised by (a preference row has a prompt too; only its chosen field tells).
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("preference", ("prompt", "chosen", "rejected"), "chosen", tokenize_pair, pairs=True),
    Format("unpaired", ("prompt", "completion", "label"), "label", tokenize_unpaired, finish=with_mismatched),
    Format("chat", ("messages", "tools"), "messages", tokenize_chat_row, conversation=True, answers=True),
    Format("sharegpt", ("conversations",), "conversations", tokenize_chat_row, conversation=True, answers=True),
    Format("alpaca", ("instruction", "input", "output"), "instruction", tokenize_alpaca, answers=True, prompt=ALPACA_PROMPT),
    Format("completion", ("text",), "text", tokenize_completion),
)}


def names(accepts: Callable[[Format], bool]) -> list[str]:
    """The formats with a property, in the registry's order (for messages that list them)."""
    return [name for name, fmt in FORMATS.items() if accepts(fmt)]
