"""Preprocess once: the cache, mixing, eval split, statistics, and training on packed data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from ftl.data import preprocess
from ftl.recipe.load import validate_recipe, with_values
from ftl.data.sources import batch_indices
from ftl.checkpoints.rundir import read_metrics
from ftl.train import train
from conftest import make_recipe, write_jsonl, write_yaml


def recipe_for(tiny_llama, demo_data, run_dir, **data):
    raw = make_recipe(tiny_llama, demo_data[0], run_dir, train={"max_steps": 6, "micro_batch_size": 2, "learning_rate": 1e-3})
    raw["data"].update({"max_length": 256, **data})
    return validate_recipe(raw).resolved()


def test_cache_is_reused_and_keyed_by_the_data(tiny_llama, demo_data, tmp_path, monkeypatch):
    recipe = recipe_for(tiny_llama, demo_data, tmp_path / "run", packing=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    first, _, stats = preprocess.prepare(recipe, tokenizer)
    assert stats["examples"] == 400 and stats["packed_rows"] == len(first) < 400
    assert 0.9 < stats["packing_efficiency"] <= 1.0
    monkeypatch.setattr(preprocess, "build_dataset", lambda *a, **k: pytest.fail("tokenized again"))
    again, _, cached = preprocess.prepare(recipe, tokenizer)
    assert again["input_ids"] == first["input_ids"] and cached["cache"] == stats["cache"]
    # Other data settings or another file are another cache entry.
    assert preprocess.cache_key(recipe_for(tiny_llama, demo_data, tmp_path / "run", packing=False), tokenizer) != preprocess.cache_key(recipe, tokenizer)
    copy = write_jsonl(tmp_path / "copy.jsonl", [json.loads(line) for line in demo_data[0].read_text().splitlines()[:100]])
    other = with_values(recipe, {"data.train.0.path": str(copy)})
    assert preprocess.cache_key(other, tokenizer) != preprocess.cache_key(recipe, tokenizer)


def test_two_ranks_read_disjoint_shards_of_the_cache(tiny_llama, demo_data, tmp_path):
    recipe = recipe_for(tiny_llama, demo_data, tmp_path / "run", packing=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    preprocess.prepare(recipe, tokenizer)
    seen = []
    for rank in (0, 1):  # each rank loads the cache on its own, as after the barrier
        rows, _, _ = preprocess.prepare(recipe, tokenizer)
        seen.append({i for batch in batch_indices(len(rows), 1, seed=0, epoch=0, rank=rank, world=2) for i in batch})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(rows) - len(rows) % 2))


def test_mixing_weights_samples_and_eval_fraction(tiny_llama, demo_data, tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", [json.loads(line) for line in demo_data[1].read_text().splitlines()])
    raw = make_recipe(tiny_llama, demo_data[0], tmp_path / "run")
    raw["data"]["train"] = [{"path": str(demo_data[0]), "samples": 150}, {"path": str(extra), "weight": 2.5}]
    raw["data"]["eval_fraction"] = 0.1
    recipe = validate_recipe(raw).resolved()
    train_set, eval_sets, stats = preprocess.prepare(recipe, AutoTokenizer.from_pretrained(tiny_llama))
    eval_set = eval_sets["eval"]
    used = [s["used"] for s in stats["sources"]]
    assert used == [150, 120]  # 48 rows x 2.5
    assert len(train_set) + len(eval_set) == 270 and len(eval_set) == 27
    assert stats["examples"] == len(train_set) and stats["length"]["max"] <= recipe.data.max_length


def test_training_on_packed_data(tiny_llama, demo_data, tmp_path):
    recipe = recipe_for(tiny_llama, demo_data, tmp_path / "run", packing=True)
    summary = train(recipe)
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["packing_efficiency"] > 0.9
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and summary.steps == 6 and losses[-1] < losses[0]


def test_ftl_preprocess_prints_statistics(tiny_llama, demo_data, tmp_path):
    raw = make_recipe(tiny_llama, demo_data[0], tmp_path / "run")
    raw["data"].update({"packing": True, "max_length": 256})
    path = write_yaml(tmp_path / "r.yaml", raw)
    out = subprocess.run([sys.executable, "-m", "ftl", "preprocess", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "400 rows, 0 truncated" in out.stdout and "of slots hold real tokens" in out.stdout
    assert json.loads((tmp_path / "run" / "data_stats.json").read_text())["examples"] == 400


def test_cache_dir(tiny_llama, demo_data, tmp_path):
    recipe = recipe_for(tiny_llama, demo_data, tmp_path / "run", cache_dir=str(tmp_path / "shared-cache"))
    _, _, stats = preprocess.prepare(recipe, AutoTokenizer.from_pretrained(tiny_llama))
    assert stats["cache"].startswith(str(tmp_path / "shared-cache")) and not (tmp_path / "run" / "data").exists()


def test_an_eval_fraction_that_leaves_no_train_rows_is_an_error(tiny_llama, tmp_path):
    from ftl.data.sources import DataError

    path = write_jsonl(tmp_path / "two.jsonl", [{"instruction": "a", "output": "b"}] * 2)
    recipe = validate_recipe(make_recipe(tiny_llama, path, tmp_path / "run", data={"eval_fraction": 0.9}))
    with pytest.raises(DataError, match="data.eval_fraction: holding out 2 of 2 rows leaves none to train on"):
        preprocess.prepare(recipe.resolved(), AutoTokenizer.from_pretrained(tiny_llama))


def test_a_cache_another_process_finished_first_is_kept(tmp_path):
    """Each machine's launcher of a multi-machine run prepares the same cache on the shared run
    directory: the one that finishes second keeps the first one's (never deleting it under a
    process that reads it) and drops its own; a damaged cache found at the start is replaced."""
    directory = tmp_path / "cache"
    for name, text in (("first", "theirs"), ("second", "ours")):
        (tmp_path / name).mkdir()
        (tmp_path / name / preprocess.STATS).write_text(text)
    preprocess._publish(tmp_path / "first", directory, stale=False)
    preprocess._publish(tmp_path / "second", directory, stale=False)
    assert (directory / preprocess.STATS).read_text() == "theirs" and not (tmp_path / "second").exists()
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / preprocess.STATS).write_text("rebuilt")
    preprocess._publish(tmp_path / "third", directory, stale=True)
    assert (directory / preprocess.STATS).read_text() == "rebuilt"


def test_preprocess_show_marks_exactly_the_trained_tokens(tiny_llama, tmp_path, capsys):
    """`ftl preprocess --show N` (not a terminal): the rows as the model sees them, trained spans
    between [[ and ]]: the reply and its end of turn, never the prompt."""
    from conftest import cli_exit_code, make_recipe, write_jsonl, write_yaml

    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]} for i in range(4)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, data, tmp_path / "run", data={"train": {"path": str(data), "format": "chat"}}))
    capsys.readouterr()
    assert cli_exit_code(["preprocess", str(recipe), "--show", "2"]) == 0
    out = capsys.readouterr().out
    shown = out[out.index("trained tokens between [[ and ]]"):]  # (its legend holds one "[[")
    assert shown.count("[[") == 3 and "[[answer 0<|im_end|>]]" in shown and "[[answer 1<|im_end|>]]" in shown
    assert "question 0" in shown and "[[question" not in shown and "row 1:" in shown and "row 2:" not in shown
