"""Streaming data: lazily read rows, disjoint per rank, and exact resume from the stream position."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import validate_recipe
from ftl.checkpoints.rundir import read_metrics
from ftl.data.streaming import RowStream
from ftl.train import train
from conftest import make_recipe, write_jsonl
from test_checkpoint import _sigterm_at


def streaming_recipe(tiny_llama, train_path, run_dir, **train_cfg):
    raw = make_recipe(tiny_llama, train_path, run_dir,
                      train={"max_steps": 12, "micro_batch_size": 4, "learning_rate": 1e-3, "save_steps": 4, **train_cfg})
    raw["data"]["streaming"] = True
    return validate_recipe(raw)


@pytest.fixture(scope="module")
def small_train(demo_data, tmp_path_factory):
    rows = [json.loads(line) for line in demo_data[0].read_text().splitlines()[:40]]
    return write_jsonl(tmp_path_factory.mktemp("stream") / "train.jsonl", rows)


def test_ranks_read_disjoint_parts_and_epochs_restart(tiny_llama, small_train, tmp_path):
    recipe = streaming_recipe(tiny_llama, small_train, tmp_path / "run").resolved()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    seen = []
    for rank in (0, 1):
        stream = RowStream(recipe, tokenizer, rank, 2)
        seen.append([tuple(r["input_ids"]) for r in stream.next_rows(20)])
        assert stream.state() == {"epoch": 0, "consumed": 20}
        stream.next_rows(1)  # the part is used up: the next epoch begins
        assert stream.state() == {"epoch": 1, "consumed": 1}
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 40


def test_resume_mid_stream_continues_exactly(tiny_llama, small_train, tmp_path):
    whole = train(streaming_recipe(tiny_llama, small_train, tmp_path / "whole"))
    assert whole.steps == 12
    reference = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    watcher = _sigterm_at(tmp_path / "parts", 6)
    first = train(streaming_recipe(tiny_llama, small_train, tmp_path / "parts"))
    watcher.join()
    assert first.stopped and first.steps < 12
    state = json.loads((tmp_path / "parts" / "checkpoints" / f"step-{first.steps}" / "data_state_rank0.json").read_text())
    assert state["consumed"] > 0  # 40 rows, 4 per step: the stop fell inside an epoch or two
    train(streaming_recipe(tiny_llama, small_train, tmp_path / "parts"))
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "parts" / "metrics.jsonl") if "loss" in r]
    assert resumed == reference


def test_streaming_needs_max_steps_and_one_plain_source(tiny_llama, small_train, tmp_path):
    raw = make_recipe(tiny_llama, small_train, tmp_path / "run", train={"max_steps": None})
    raw["data"].update({"streaming": True, "packing": True})
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    assert "train.max_steps" in str(err.value) and "data.packing" in str(err.value)


def test_a_stream_without_usable_rows_stops_with_an_error(tiny_llama, tmp_path):
    """Every row's response lies beyond max_length: the stream must not loop over its epochs forever."""
    from ftl.data.sources import DataError

    rows = [{"instruction": "word " * 40, "output": "x"} for _ in range(6)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    raw = make_recipe(tiny_llama, path, tmp_path / "run", train={"max_steps": 2, "micro_batch_size": 2})
    raw["data"].update(streaming=True, max_length=8)
    with pytest.raises(DataError, match="long.jsonl: none of the 6 rows this rank read has a trainable token"):
        train(validate_recipe(raw))
