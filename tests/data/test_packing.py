"""Packing: no cross-contamination between examples, dense rows, every example once."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.recipe.schema import DataSection, DataSource
from ftl.data.sources import build_dataset
from ftl.objectives.batch import pad_rows
from ftl.objectives.batch import IGNORE_INDEX
from ftl.objectives.sft import causal_lm_loss_sum
from ftl.data.packing import best_fit_decreasing, pack_dataset
from ftl.tiny import write_tiny_model


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "qwen2", "qwen2", hidden_size=64)


def packed_and_alone(model, tokenizer, rows, contaminate: bool = False):
    """Per-token logits of each example inside its packed row, and run alone."""
    batch = pad_rows(rows, tokenizer.pad_token_id)
    positions = batch.position_ids
    if contaminate:  # one long sequence: plain causal attention across example boundaries
        positions = torch.arange(positions.shape[1]).expand_as(positions)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=positions, use_cache=False).logits
    pairs = []
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for start, end in zip(starts, starts[1:]):
            ids = torch.tensor([row["input_ids"][start:end]])
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
            pairs.append((packed[r, start:end], alone))
    return batch, pairs


@pytest.mark.parametrize("arch, attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_examples_compute_what_they_compute_alone(arch, attn, tiny_llama, tiny_qwen2, demo_data):
    path = tiny_llama if arch == "llama" else tiny_qwen2
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = DataSection(train=[DataSource(path=str(demo_data[0]))], max_length=128, mask_prompt=False)
    examples = build_dataset(cfg.train, tokenizer, cfg).select(range(24))
    packed, stats = pack_dataset(examples, max_length=256)
    assert stats["examples"] == 24 and stats["packed_rows"] < 24
    rows = [packed[i] for i in range(2)]  # a micro-batch of two rows of different fill: padding too
    assert len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])
    batch, pairs = packed_and_alone(model, tokenizer, rows)
    assert len(pairs) > 4
    for inside, alone in pairs:
        assert (inside - alone).abs().max().item() <= 1e-5
    # The loss of the packed micro-batch is the sum of the examples' losses run alone.
    with torch.no_grad():
        total = causal_lm_loss_sum(model, batch)
        alone_sum = 0.0
        for row in rows:
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            for s, e in zip(starts, starts[1:]):
                one = pad_rows([{"input_ids": row["input_ids"][s:e], "labels": row["labels"][s:e]}], tokenizer.pad_token_id)
                alone_sum += causal_lm_loss_sum(model, one).item()
    assert abs(total.item() - alone_sum) <= 1e-5 * abs(alone_sum)
    # Deliberately contaminated: without the position restarts, later examples see earlier ones.
    _, contaminated = packed_and_alone(model, tokenizer, rows, contaminate=True)
    assert max((inside - alone).abs().max().item() for inside, alone in contaminated) > 1e-3


def test_first_token_of_each_example_is_never_a_target(tiny_llama, demo_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataSection(train=[DataSource(path=str(demo_data[0]), format="alpaca")], max_length=128, mask_prompt=False)
    packed, _ = pack_dataset(build_dataset(cfg.train, tokenizer, cfg).select(range(16)), max_length=256)
    for row in packed:
        for i, p in enumerate(row["position_ids"]):
            if p == 0:
                assert row["labels"][i] == IGNORE_INDEX


def test_skewed_lengths_pack_densely_and_each_example_once():
    rng = random.Random(0)
    # Long-tailed like instruction data: most examples short, a few near the limit.
    lengths = [min(2048, max(8, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(5000)]
    bins = best_fit_decreasing(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    efficiency = sum(lengths) / (len(bins) * 2048)
    assert efficiency >= 0.95, efficiency


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="more than the row length"):
        best_fit_decreasing([10, 300], 256)


def test_padding_is_isolated_too():
    """Pad tokens of a packed row form their own block, with no labels."""
    batch = pad_rows([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
                     {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 0, 1, 2]}], pad_token_id=0)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1]
    assert batch.labels[0].tolist()[3:] == [IGNORE_INDEX, IGNORE_INDEX]
    assert batch.attention_mask is None and batch.token_mask.sum().item() == 8
