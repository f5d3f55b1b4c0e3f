"""Preference rows: a prompt and two responses, chosen and rejected, tokenized as two sequences.

Two forms of row (field names mappable with ``fields``, as for the other formats):

- text: ``prompt``, ``chosen``, ``rejected`` strings. Each side is the prompt and the response
  tokenized together (with the tokenizer's special tokens, and EOS after the response where
  ``data.add_eos``), the response starting where that and the prompt tokenized alone diverge, so a
  token merged across the boundary belongs to the response (what TRL does too).
- chat: ``prompt`` a list of messages, ``chosen``/``rejected`` an assistant message or a list of
  messages. Each side is one conversation rendered by ``ftl.data.chat`` with its last assistant turn
  trained: exactly that reply and its end-of-turn token are targets, as in supervised chat
  training (not the newline some templates write after the end-of-turn token).

A row is the chosen sequence (``input_ids``/``labels``, so length statistics and truncation
reports work as for other rows) plus ``rejected_input_ids``/``rejected_labels``. A row whose two
sides are the same tokens, or that has no response token left after ``data.max_length``, teaches
nothing: an error naming file and row, or with ``data.invalid_pairs: drop`` dropped and counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftl.data.chat import tokenize_conversation
from ftl.errors import DataError
from ftl.objectives.batch import IGNORE_INDEX

if TYPE_CHECKING:  # (annotations only: the recipe schema imports the rules, which read the formats)
    from ftl.recipe.schema import DataSection, DataSource

INVALID = "invalid"  # column marking the rows data.invalid_pairs: drop removes


def tokenize_pair(row: dict, source: DataSource, tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    prompt, chosen, rejected = (response_field(row, source, name, where, "preference format needs prompt, chosen and rejected")
                                for name in ("prompt", "chosen", "rejected"))
    if isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise DataError(f"{where}: prompt is text, so chosen and rejected must be text too")
        sides = _text_pair(prompt, chosen, rejected, tokenizer, cfg.add_eos)
    else:
        sides = [chat_side(prompt, response, name, source, tokenizer, where)
                 for name, response in (("chosen", chosen), ("rejected", rejected))]
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sides
    truncated = max(len(chosen_ids), len(rejected_ids)) > cfg.max_length
    chosen_ids, chosen_labels = chosen_ids[: cfg.max_length], chosen_labels[: cfg.max_length]
    rejected_ids, rejected_labels = rejected_ids[: cfg.max_length], rejected_labels[: cfg.max_length]
    problem = None
    if chosen_ids == rejected_ids:
        problem = "chosen and rejected are the same tokens" + (" after truncation to data.max_length" if truncated else "")
    elif all(t == IGNORE_INDEX for t in chosen_labels) or all(t == IGNORE_INDEX for t in rejected_labels):
        problem = "no response token is left of chosen or rejected within data.max_length"
    if problem and cfg.invalid_pairs == "error":
        raise DataError(f"{where}: {problem}; fix the row, raise data.max_length, or set data.invalid_pairs: drop")
    out = {"input_ids": chosen_ids, "labels": chosen_labels, "rejected_input_ids": rejected_ids,
           "rejected_labels": rejected_labels, "truncated": truncated, INVALID: problem or ""}
    margin = row.get(source.fields.get("margin", "margin"))
    if margin is not None:  # how much better chosen is (reward models: TRL's margin)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(f"{where}: field 'margin' must be a number, got {margin!r}")
        out["margin"] = float(margin)
    return out


def response_field(row: dict, source: DataSource, name: str, where: str, needs: str) -> Any:
    """A prompt or response field: text or messages, never empty (``needs`` says what the format needs)."""
    column = source.fields.get(name, name)
    value = row.get(column)
    if value is None or (isinstance(value, (str, list)) and not value):
        raise DataError(f"{where}: missing field '{column}' ({needs})")
    if not isinstance(value, (str, list, dict)):
        raise DataError(f"{where}: field '{column}' must be text or messages, got {type(value).__name__}")
    return value


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _text_pair(prompt: str, chosen: str, rejected: str, tokenizer: Any, add_eos: bool) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token if add_eos and tokenizer.eos_token else ""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = [tokenizer(prompt + response + ("" if response.endswith(eos) else eos))["input_ids"] for response in (chosen, rejected)]
    start = min(common_prefix(prompt_ids, ids) for ids in full)
    return [(ids, [IGNORE_INDEX] * start + ids[start:]) for ids in full]


def chat_side(prompt: Any, response: Any, name: str, source: DataSource, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(prompt, list):
        raise DataError(f"{where}: prompt must be text or a list of messages")
    turns = [response] if isinstance(response, dict) else response
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict) or turns[-1].get("role") != "assistant":
        raise DataError(f"{where}: {name} must be an assistant message or a list of messages ending with one")
    conversation = source.model_copy(update={"format": "chat", "mask_history": True, "fields": {}})
    ids, targets = tokenize_conversation({"messages": prompt + turns}, conversation, tokenizer, f"{where}: {name}")
    return ids, [t if on else IGNORE_INDEX for t, on in zip(ids, targets)]
