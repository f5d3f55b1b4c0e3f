"""Unpaired rows (KTO): a prompt, one completion and a label saying whether it is desirable.

Fields (mappable with ``fields``): ``prompt``, ``completion`` and ``label`` (true or false). Text
rows tokenize as preference rows do (``ftl.data.pairs``): prompt and completion together
(EOS after the completion where ``data.add_eos``), the completion from where that and the prompt
alone diverge, as TRL does. Chat rows: ``prompt`` a list of messages, ``completion`` an assistant
message or a list of messages; exactly the last reply and its end-of-turn token are trained.

The KL reference point needs mismatched pairs: :func:`with_mismatched` gives every row the
prompt of that row with the completion of the row before it (the last row's with the first
row's prompt), over the whole tokenized set, once, so a row's pair does not depend on how rows are
batched, split across ranks or accumulated (TRL rotates within each batch of its unshuffled data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftl.errors import DataError
from ftl.objectives.batch import IGNORE_INDEX
from ftl.data.pairs import chat_side, common_prefix, response_field

if TYPE_CHECKING:  # (annotations only: the recipe schema imports the rules, which read the formats)
    import datasets

    from ftl.recipe.schema import DataSection, DataSource


def tokenize_unpaired(row: dict, source: DataSource, tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    prompt, completion = (response_field(row, source, name, where, "unpaired format needs prompt, completion and label")
                          for name in ("prompt", "completion"))
    column = source.fields.get("label", "label")
    label = row.get(column)
    if not isinstance(label, bool):
        raise DataError(f"{where}: field '{column}' must be true (desirable) or false (undesirable), got {label!r}")
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise DataError(f"{where}: prompt is text, so completion must be text too")
        eos = tokenizer.eos_token if cfg.add_eos and tokenizer.eos_token else ""
        ids = tokenizer(prompt + completion + ("" if completion.endswith(eos) else eos))["input_ids"]
        start = common_prefix(tokenizer(prompt)["input_ids"], ids)
        labels = [IGNORE_INDEX] * start + ids[start:]
    else:
        ids, labels = chat_side(prompt, completion, "completion", source, tokenizer, where)
        start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    if start == len(ids):
        raise DataError(f"{where}: the completion adds no token to the prompt")
    return {"input_ids": ids[: cfg.max_length], "labels": labels[: cfg.max_length], "prompt_length": start,
            "desirable": label, "truncated": len(ids) > cfg.max_length, "full_ids": ids, "full_labels": labels}


def with_mismatched(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Each row's ``kl_input_ids``/``kl_labels``: its prompt, then the previous row's completion."""
    def pair(rows: dict[str, list]) -> dict[str, list]:
        n = len(rows["prompt_length"])
        kl_ids, kl_labels = [], []
        for i in range(n):
            start, before = rows["prompt_length"][i], (i - 1) % n
            other = rows["prompt_length"][before]
            ids = rows["full_ids"][i][:start] + rows["full_ids"][before][other:]
            labels = [IGNORE_INDEX] * start + rows["full_labels"][before][other:]
            kl_ids.append(ids[:max_length])
            kl_labels.append(labels[:max_length])
        return {"kl_input_ids": kl_ids, "kl_labels": kl_labels}

    with_pairs = dataset.map(pair, batched=True, batch_size=None, desc="pairing prompts with other completions (KTO's KL)")
    return with_pairs.remove_columns(["full_ids", "full_labels", "prompt_length"])
