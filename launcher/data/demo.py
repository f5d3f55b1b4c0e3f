"""The demo's deterministic instruction task: simple operations on short word lists.

Each example lists a color, an animal and a weather word in random order and asks for the word of
one category. The answer is a pure function of the input, so held-out exact-match accuracy
measures whether the model learnt the rule (the held-out lists never occur in training).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

CATEGORIES = {
    "color": "red blue green gold pink gray black white".split(),
    "animal": "cat dog fox owl bee cow pig ant".split(),
    "weather": "sun moon star rain snow wind fire ice".split(),
}
WORDS = [w for words in CATEGORIES.values() for w in words]
INSTRUCTIONS = {
    "Which word is a color?": "color",
    "Which word is an animal?": "animal",
    "Which word is about the weather?": "weather",
}


def examples(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct alpaca rows; inputs listed in ``exclude`` are never produced.

    The input holds one word of each category in random order; the answer is the word of the
    asked category, so the model must find it by meaning, not by position.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    seen = set(exclude or ())
    instructions = list(INSTRUCTIONS)
    while len(rows) < n:
        words = [rng.choice(ws) for ws in CATEGORIES.values()]
        rng.shuffle(words)
        instruction = instructions[len(rows) % len(instructions)]
        key = instruction + "|" + " ".join(words)
        if key in seen:
            continue
        seen.add(key)
        answer = next(w for w in words if w in CATEGORIES[INSTRUCTIONS[instruction]])
        rows.append({"instruction": instruction, "input": " ".join(words), "output": answer})
    return rows


def write_demo_data(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and a disjoint held-out ``eval.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held_out = examples(n_eval, seed + 1)
    train = examples(n_train, seed, exclude={r["instruction"] + "|" + r["input"] for r in held_out})
    return _write_split(out, train, held_out)


def _write_split(out: Path, train: list[dict], held_out: list[dict]) -> tuple[Path, Path]:
    paths = []
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def corpus() -> Iterator[str]:
    """Text to train the tiny tokenizer on: the task's vocabulary, the prompt templates, chat roles."""
    rng = random.Random(0)
    for _ in range(300):
        words = rng.sample(WORDS, 4)
        yield " ".join(words)
        yield "\n".join(words)
    for instruction in INSTRUCTIONS:
        yield instruction
    yield "### Instruction:\n### Input:\n### Response:\n system user assistant"
    yield "Below is an instruction that describes a task. Write a response that completes the request."
    yield "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 Hello, world! What is 2 + 2?"


# ----------------------------------------------------------------------------- the real-model demo

NAMES = ("Alice Bruno Chen Dana Emeka Fatima Goran Hana Ivan Jomo Kenji Lena Mateo Nadia Omar Priya Quinn Rosa Sami "
         "Tariq Uma Viktor Wen Ximena Yusuf Zara").split()
CITIES = "Paris Lagos Lima Oslo Hanoi Quito Dakar Porto Riga Tunis Kyoto Perth Cairo Delhi Seoul Accra Minsk Sofia Bern Rabat".split()
SENTENCES = ("{name} moved to {city} last year.", "Yesterday {name} flew to {city} for work.", "{name} has lived in {city} since 2019.",
             "After the conference in {city}, {name} stayed a week.", "The new office of {name} is in {city}.", "{name} was born in {city}.")
EXTRACT = "Extract the person and the city as JSON: "


def extraction_examples(n: int, seed: int, exclude: set[tuple[str, str]] | None = None) -> list[dict]:
    """``n`` chat rows asking for the person and city of a sentence as one-line JSON, with distinct
    (person, city) pairs; pairs in ``exclude`` are never produced.

    A pretrained instruct model answers in its own style (prose, or JSON of another shape), so
    exact match measures whether fine-tuning taught the format the data asks for."""
    rng = random.Random(seed)
    rows: list[dict] = []
    seen = set(exclude or ())
    while len(rows) < n:
        name, city, sentence = rng.choice(NAMES), rng.choice(CITIES), rng.choice(SENTENCES)
        if (name, city) in seen:
            continue
        seen.add((name, city))
        rows.append({"messages": [{"role": "user", "content": EXTRACT + sentence.format(name=name, city=city)},
                                  {"role": "assistant", "content": json.dumps({"name": name, "city": city})}]})
    return rows


def write_extraction_data(out_dir: str | Path, n_train: int = 400, n_eval: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` and a held-out ``eval.jsonl`` (chat format) whose (person, city) pairs never occur in training."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held_out = extraction_examples(n_eval, seed + 1)
    answers = [json.loads(r["messages"][1]["content"]) for r in held_out]
    train = extraction_examples(n_train, seed, exclude={(a["name"], a["city"]) for a in answers})
    return _write_split(out, train, held_out)


def write_preference_data(out_dir: str | Path, n_train: int = 400, n_eval: int = 40, seed: int = 0) -> dict[str, Path]:
    """The DPO demo's data, on the extraction task: the right answer, and a wrong one (person and city
    swapped). ``wrong.jsonl`` (chat rows answered wrongly) makes a model that prefers the wrong answer;
    ``train.jsonl`` and held-out ``eval.jsonl`` are preference pairs (chosen right, rejected wrong)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held_out = extraction_examples(n_eval, seed + 1)
    answers = [json.loads(r["messages"][1]["content"]) for r in held_out]
    train = extraction_examples(n_train, seed, exclude={(a["name"], a["city"]) for a in answers})

    def wrong(row: dict) -> dict:
        answer = json.loads(row["messages"][1]["content"])
        return {"role": "assistant", "content": json.dumps({"name": answer["city"], "city": answer["name"]})}

    def pair(row: dict) -> dict:
        return {"prompt": row["messages"][:1], "chosen": row["messages"][1], "rejected": wrong(row)}

    paths = {"wrong": out / "wrong.jsonl", "train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    for name, rows in (("wrong", [{"messages": r["messages"][:1] + [wrong(r)]} for r in train]),
                       ("train", [pair(r) for r in train]), ("eval", [pair(r) for r in held_out])):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
