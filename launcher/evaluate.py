"""Held-out exact-match accuracy by greedy generation.

Eval loss says the model got closer; exact match says it now gives the right answer. The prompt
is rendered exactly as in training (same template, same tokenization), the model generates
greedily until EOS, and the stripped text must equal the reference answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftl.recipe.schema import DataSource
from ftl.data.chat import parse_conversation, render
from ftl.data.sources import DataError, load_source
from ftl.data.formats import FORMATS, names
from ftl.data.text import render_alpaca


def questions(source: DataSource, limit: int | None = None) -> list[tuple[Any, str, str]]:
    """(prompt: text or (messages, tools), reference answer, where) per row: the data checked before
    any model is loaded."""
    fmt = FORMATS[source.format]
    if not fmt.answers:
        raise DataError(f"{source.path}: exact match needs prompts and answers ({', '.join(names(lambda f: f.answers))} "
                        f"format, not {source.format})")
    rows = load_source(source)
    found = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        where = f"{source.path}: row {index}"
        if not fmt.conversation:
            prompt, answer = render_alpaca(row, source, where)
            found.append((prompt[0], answer[0], where))
        else:
            messages, tools = parse_conversation(row, source, where)
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: for exact match, the conversation must end with an assistant turn")
            found.append(((messages[:-1], tools), messages[-1]["content"], where))
    return found


def prompts_and_answers(source: DataSource, tokenizer: Any, limit: int | None = None,
                        rows: list[tuple[Any, str, str]] | None = None) -> list[tuple[list[int], str]]:
    """(prompt token ids, reference answer) for each row of an alpaca or chat source."""
    pairs = []
    for prompt, answer, where in rows if rows is not None else questions(source, limit):
        if not FORMATS[source.format].conversation:
            pairs.append((tokenizer(prompt, add_special_tokens=True)["input_ids"], answer))
        else:
            text = render(tokenizer, prompt[0], prompt[1], True, where)
            pairs.append((tokenizer(text, add_special_tokens=False)["input_ids"], answer))
    return pairs


def detect_format(path: str | Path) -> str:
    """The format of a data file whose format is not given: a run's recipe names it; otherwise its
    first row's fields (``chosen``: preference, ``label``: unpaired, ``messages``: chat, ``conversations``:
    sharegpt, ``instruction``: alpaca, ``text``: completion)."""
    rows = load_source(DataSource(path=str(path), format="completion"))
    first = rows[0] if len(rows) else {}
    for name, fmt in FORMATS.items():
        if fmt.marker in first:
            return name
    fields = ", ".join(fmt.marker for fmt in FORMATS.values())
    raise DataError(f"{path}: cannot tell its format from its first row (no {fields} field); pass --format, or see the "
                    "README's data formats")


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy completions of token-id prompts, decoded and stripped (left-padded batches)."""
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):  # left padding, so every prompt ends at the same column
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts += [tokenizer.decode(out[i, width:], skip_special_tokens=True).strip() for i in range(len(chunk))]
    return texts


def exact_match(
    model: Any, tokenizer: Any, pairs: list[tuple[list[int], str]], max_new_tokens: int = 32, batch_size: int = 32
) -> tuple[float, list[dict[str, str]]]:
    """Accuracy over ``pairs`` and the first few (expected, generated) examples."""
    texts = generate_texts(model, tokenizer, [ids for ids, _ in pairs], max_new_tokens, batch_size)
    correct = sum(text == answer.strip() for text, (_, answer) in zip(texts, pairs))
    shown = [{"expected": answer, "generated": text} for text, (_, answer) in list(zip(texts, pairs))[:5]]
    return correct / max(len(pairs), 1), shown


def generation_rows(sources: list[DataSource], tokenizer: Any, limit: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of the first ``limit`` rows of ``sources``, in order."""
    pairs: list[tuple[list[int], str]] = []
    for source in sources:
        pairs += prompts_and_answers(source, tokenizer, limit - len(pairs))
        if len(pairs) >= limit:
            break
    return pairs


def score_generations(model: Any, tokenizer: Any, pairs: list[tuple[list[int], str]], specs: list[str],
                      max_new_tokens: int) -> dict[str, list[float]]:
    """Every scorer's score of each row's greedy completion (``ftl.scorers``): what ``eval.generate``
    logs during training and ``ftl eval --scorers`` reports."""
    from ftl import scorers

    texts = generate_texts(model, tokenizer, [ids for ids, _ in pairs], max_new_tokens)
    prompts = [tokenizer.decode(ids) for ids, _ in pairs]
    return scorers.score(specs, prompts, texts, [answer for _, answer in pairs])


def evaluate_path(
    model_path: str | Path, data: DataSource, limit: int | None = None, trust_remote_code: bool = False
) -> tuple[float, int, list]:
    """Load a model or checkpoint and measure exact match on ``data``."""
    model, tokenizer, pairs = _load_with_rows(model_path, data, limit, trust_remote_code)
    accuracy, examples = exact_match(model, tokenizer, pairs)
    return accuracy, len(pairs), examples


def scores_path(model_path: str | Path, data: DataSource, specs: list[str], limit: int | None = None, max_new_tokens: int = 64,
                trust_remote_code: bool = False) -> tuple[dict[str, float], int]:
    """``ftl eval --scorers``: each scorer's mean over ``data``'s greedy completions (as eval.generate)."""
    model, tokenizer, pairs = _load_with_rows(model_path, data, limit, trust_remote_code)
    scores = score_generations(model, tokenizer, pairs, specs, max_new_tokens)
    return {name: sum(values) / max(len(values), 1) for name, values in scores.items()}, len(pairs)


def _load_with_rows(model_path: str | Path, data: DataSource, limit: int | None, trust_remote_code: bool) -> tuple[Any, Any, list]:
    from ftl.checkpoints.checkpoint import MANIFEST, STATE, verify
    from ftl.models.build import load_for_inference

    path = Path(model_path)
    if (path / STATE).exists() or (path / MANIFEST).exists():
        verify(path)  # a checkpoint: only an intact one is evaluated (export verifies its own)
    rows = questions(data, limit)  # bad data fails before minutes of model loading
    model, tokenizer = load_for_inference(path, trust_remote_code=trust_remote_code)
    return model, tokenizer, prompts_and_answers(data, tokenizer, limit, rows)


@torch.no_grad()
def preference_accuracy(model_path: str | Path, data: DataSource, max_length: int = 512, limit: int | None = None,
                        trust_remote_code: bool = False) -> dict[str, float]:
    """On preference rows: how often the model gives the chosen response a higher log-probability than
    the rejected one, and, for an adapter (whose disabled state is the reference), how often DPO's
    implicit reward (the log-ratio to the reference) is higher for the chosen one. A reward model
    (a score head): how often it scores the chosen response higher (pairwise accuracy), and by how much."""
    from contextlib import nullcontext

    from ftl.recipe.schema import DataSection
    from ftl.data.sources import build_dataset
    from ftl.checkpoints.checkpoint import MANIFEST, STATE, verify
    from ftl.models.build import head_of, load_for_inference
    from ftl.objectives.base import precompute_reference
    from ftl.objectives.preference import collate_pairs, pair_logps
    from ftl.objectives.reward import collate_scored, scores

    path = Path(model_path)
    if (path / STATE).exists() or (path / MANIFEST).exists():
        verify(path)  # a checkpoint: only an intact one is evaluated
    model, tokenizer = load_for_inference(path, trust_remote_code=trust_remote_code)
    rows = build_dataset([data], tokenizer, DataSection(train=[data], max_length=max_length))
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    device = next(model.parameters()).device
    if head_of(path) == "score":
        rewards = precompute_reference(model, lambda r: collate_scored(r, tokenizer.pad_token_id),
                                       lambda m, b: scores(m, b.tokens).view(2, -1).t(), rows, 8, device, lambda d: nullcontext())
        return {"rows": len(rows), "pairwise_accuracy": (rewards[:, 0] > rewards[:, 1]).float().mean().item(),
                "mean_margin": (rewards[:, 0] - rewards[:, 1]).mean().item()}

    def logps() -> torch.Tensor:  # (chosen, rejected) per row
        return precompute_reference(model, lambda r: collate_pairs(r, tokenizer.pad_token_id), pair_logps, rows, 8, device,
                                    lambda d: nullcontext())

    policy = logps()
    result = {"rows": len(rows), "likelihood_accuracy": (policy[:, 0] > policy[:, 1]).float().mean().item()}
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            ratios = policy - logps()
        result["reward_accuracy"] = (ratios[:, 0] > ratios[:, 1]).float().mean().item()
    return result
