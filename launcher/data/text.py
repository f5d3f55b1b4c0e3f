"""Alpaca and completion rows: rendered as (text, trainable) segments tokenized one by one, so the
prompt is tokenized exactly as it will be at inference time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftl.errors import DataError
from ftl.objectives.batch import IGNORE_INDEX

if TYPE_CHECKING:  # (annotations only: the recipe schema imports the rules, which read the formats)
    from ftl.recipe.schema import DataSection, DataSource

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def render_alpaca(row: dict, source: DataSource, where: str) -> list[tuple[str, bool]]:
    """An alpaca row as (text, is_response) segments: the prompt around instruction and input, then the output."""
    instruction = _field(row, source, "instruction", where)
    extra = _field(row, source, "input", where, required=False)
    output = _field(row, source, "output", where)
    template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
    return [(template.format(instruction=instruction, input=extra), False), (output, True)]


def render_completion(row: dict, source: DataSource, where: str) -> list[tuple[str, bool]]:
    """A completion row: its text, all of it trained."""
    return [(_field(row, source, "text", where), True)]


def _field(row: dict, source: DataSource, name: str, where: str, required: bool = True) -> str | None:
    column = source.fields.get(name, name)
    value = row.get(column)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{column}' ({source.format} format needs '{name}')")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- tokenizing


def tokenize_segments(
    segments: list[tuple[str, bool]], tokenizer: Any, mask_prompt: bool, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, trainable) in enumerate(segments):
        ids = tokenizer(text, add_special_tokens=add_special_tokens and i == 0)["input_ids"]
        input_ids += ids
        labels += ids if (trainable or not mask_prompt) else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def tokenize_alpaca(row: dict, source: DataSource, tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    return _tokenize(render_alpaca(row, source, where), tokenizer, cfg, where)


def tokenize_completion(row: dict, source: DataSource, tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    return _tokenize(render_completion(row, source, where), tokenizer, cfg, where)


def _tokenize(segments: list[tuple[str, bool]], tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    if cfg.add_eos and tokenizer.eos_token:
        segments.append((tokenizer.eos_token, True))
    input_ids, labels = tokenize_segments(segments, tokenizer, cfg.mask_prompt, add_special_tokens=True)
    return truncated_row(input_ids, labels, cfg, where)


def truncated_row(input_ids: list[int], labels: list[int], cfg: DataSection, where: str) -> dict[str, Any]:
    """A supervised row cut to ``data.max_length``; a row with nothing to train is an error."""
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{where}: no trainable token (empty response or no assistant turn)")
    return {"input_ids": input_ids[: cfg.max_length], "labels": labels[: cfg.max_length], "truncated": len(input_ids) > cfg.max_length}
