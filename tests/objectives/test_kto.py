"""KTO: ftl's loss and gradients against TRL's KTOTrainer (the oracle), its unpaired rows and
mismatched pairs as TRL builds them, and KTO runs through the real loop (accumulation, resume,
the reference as a frozen copy or precomputed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from ftl.recipe.schema import DataSection, DataSource
from ftl.recipe.load import validate_recipe
from ftl.data.sources import build_dataset
from ftl.errors import DataError
from ftl.objectives import build as build_objective
from ftl.objectives.batch import IGNORE_INDEX, Tokens
from ftl.objectives.kto import Unpaired
from conftest import make_recipe, write_jsonl
from test_preference import _grads, _move, _policy

ROWS = [
    {"prompt": "The sky is", "completion": " blue and wide.", "label": True},
    {"prompt": "Two plus two is", "completion": " five, or maybe six.", "label": False},
    {"prompt": "Write a word:", "completion": " hello", "label": True},
    {"prompt": "Capital of France?", "completion": " Rome is the capital.", "label": False},
    {"prompt": "Say yes:", "completion": " yes", "label": True},
]
UNPAIRED = {"train": {"path": "x.jsonl", "format": "unpaired"}}


def _trl(model, tokenizer, tmp_path: Path, **config):
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], per_device_train_batch_size=len(ROWS),
                     bf16=False, max_length=512, **config)
    return KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


def _as_ftl_batch(batch: dict) -> Unpaired:
    """TRL's collated rows as ftl's batch: completions, the mismatched (KL) sequences, the labels."""
    def tokens(prefix: str) -> Tokens:
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        labels = ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, IGNORE_INDEX)
        return Tokens(ids, labels, token_mask=mask, attention_mask=mask)

    return Unpaired(tokens(""), tokens("KL_"), torch.as_tensor(batch["label"], dtype=torch.bool))


def _recipe(tiny_llama: Path, tmp_path: Path, **kto) -> object:
    return validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", data=UNPAIRED,
                                       method={"objective": "kto"}, kto=kto))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("weights", [{}, {"desirable_weight": 1.33, "undesirable_weight": 0.8}])
def test_loss_and_gradients_equal_trls(tiny_llama, tmp_path, weights, dtype):
    """On the same model, adapter and batch, ftl's KTO loss and gradients equal TRL's (1e-5), the KL
    reference point included, in float32 and in bf16 (the recipe's default weights and compute: both
    take log-probabilities in float32); another beta or weight gives another loss."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = _policy(tiny_llama).to(dtype)
    trainer = _trl(model, tokenizer, tmp_path, beta=0.3, **weights)
    _move(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    model.train()
    model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = _grads(model)
    kl = trainer._metrics["train"]["kl"][-1]

    ours = build_objective(_recipe(tiny_llama, tmp_path, beta=0.3, **weights), tokenizer.pad_token_id)
    ftl_batch = _as_ftl_batch(batch)
    model.zero_grad()
    ours.begin_step(model, [ftl_batch], lambda t: t)
    ftl_loss = ours.loss_sum(model, ftl_batch) / ours.targets(ftl_batch)
    ftl_loss.backward()
    ftl_grads = _grads(model)

    assert kl > 0  # the moved adapter: a reference point that matters
    assert ours.take_metrics(lambda t: t)["kl"] == pytest.approx(kl, abs=1e-5)  # a difference of sums of log-probabilities
    assert abs(ftl_loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), (ftl_loss.item(), trl_loss.item())
    assert set(ftl_grads) == set(trl_grads) and ftl_grads
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ftl_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    for changed in ({"beta": 0.9}, {"desirable_weight": 2.0}, {"undesirable_weight": 2.0}):
        other = build_objective(_recipe(tiny_llama, tmp_path, **{"beta": 0.3, **weights, **changed}), tokenizer.pad_token_id)
        with torch.no_grad():
            other.begin_step(model, [ftl_batch], lambda t: t)
            assert abs(other.loss_sum(model, ftl_batch).item() / len(ROWS) - trl_loss.item()) > 1e-4, changed


def test_rows_and_mismatched_pairs_tokenize_as_trl_does(tiny_llama, tmp_path):
    """Prompt and completion tokenized together, the completion from where they diverge, EOS appended;
    each row's KL sequence is its prompt with the previous row's completion, as TRL rotates them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    trainer = _trl(_policy(tiny_llama), tokenizer, tmp_path)
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    source = DataSource(path=str(path), format="unpaired")
    ours = build_dataset([source], tokenizer, DataSection(train=[source]))
    for i in range(len(ROWS)):
        theirs, row = trainer.train_dataset[i], ours[i]
        n = len(theirs["prompt_ids"])
        assert row["input_ids"] == theirs["prompt_ids"] + theirs["completion_ids"]
        assert row["labels"] == [IGNORE_INDEX] * n + theirs["completion_ids"]
        assert row["kl_input_ids"] == theirs["prompt_ids"] + theirs["KL_completion_ids"]
        assert row["kl_labels"] == [IGNORE_INDEX] * n + theirs["KL_completion_ids"]
        assert row["desirable"] == ROWS[i]["label"] and row["labels"][-1] == tokenizer.eos_token_id


def test_bad_rows_and_recipes_are_one_line_errors(tiny_llama, tmp_path):
    from ftl.recipe.schema import RecipeError

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    source = DataSource(path=str(write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {**ROWS[1], "label": "yes"}])), format="unpaired")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'label' must be true \(desirable\) or false"):
        build_dataset([source], tokenizer, DataSection(train=[source]))
    with pytest.raises(RecipeError, match=r"data\.train\.0\.format: method.objective kto trains on unpaired rows"):
        validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", method={"objective": "kto"}))
    with pytest.raises(RecipeError, match=r"data\.train\.0\.format: unpaired rows need method.objective kto"):
        validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", data=UNPAIRED))
    with pytest.raises(RecipeError, match=r"kto\.beta: applies to method.objective kto, not dpo"):
        validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", method={"objective": "dpo"},
                                    data={"train": {"path": "x.jsonl", "format": "preference"}}, kto={"beta": 0.5}))
    with pytest.raises(RecipeError, match=r"preference\.beta: applies to method.objective dpo or ipo or simpo, not kto"):
        validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", method={"objective": "kto"},
                                    data=UNPAIRED, preference={"beta": 0.5}))


def feedback(n: int) -> list[dict]:
    """The category task of the preference tests as unpaired feedback: right answers desirable, wrong ones not."""
    from test_preference import _pairs

    rows = []
    for i, pair in enumerate(_pairs(n)):
        good = i % 3 != 0  # more desirable rows than undesirable, as feedback data tends to be
        rows.append({"prompt": "please " * (i % 4) + pair["prompt"], "completion": pair["chosen" if good else "rejected"],
                     "label": good})
    return rows


def _run(tiny_llama: Path, path: Path, run_dir: Path, method: str = "lora", kto: dict | None = None, **train_cfg) -> Path:
    from ftl.train import train

    cfg = {"max_steps": 6, "micro_batch_size": 8, "learning_rate": 5e-3 if method == "lora" else 1e-3, "logging_steps": 1,
           "seed": 0, **train_cfg}
    train(validate_recipe(make_recipe(tiny_llama, path, run_dir, path, data={"train": {"path": str(path), "format": "unpaired"},
                                                                              "eval": {"path": str(path), "format": "unpaired"}},
                                      method={"type": method, "objective": "kto", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                                      kto=kto or {}, train=cfg)))
    return run_dir


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_accumulation_equals_one_big_batch_and_the_run_learns(tiny_llama, tmp_path):
    """Micro-batch 2 x 4 accumulation = micro-batch 8 (the KL point and the mean are over the step's
    rows, not each micro-batch); the run logs KTO's metrics and learns."""
    from test_checkpoint import assert_accumulation_equals_one_batch

    path = write_jsonl(tmp_path / "rows.jsonl", feedback(48))
    records = assert_accumulation_equals_one_batch(lambda run_dir, **cfg: _run(tiny_llama, path, run_dir, **cfg), tmp_path)
    a = [r["loss"] for r in records]
    last = records[-1]
    assert {"kl", "rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen", "logps_rejected"} <= set(last)
    assert last["reward_margin"] > 0 and a[-1] < a[0]


def test_full_fine_tuning_reference_copy_and_precomputed_give_one_trace(tiny_llama, tmp_path):
    """Full fine-tuning: the frozen reference copy and the precomputed log-probabilities (completion
    and mismatched sequence of every row) are the same reference; a resumed run reads them back."""
    from test_checkpoint import _sigterm_at

    path = write_jsonl(tmp_path / "rows.jsonl", feedback(32))
    copy = _run(tiny_llama, path, tmp_path / "copy", method="full", kto={"reference": "model"}, max_steps=8)
    watcher = _sigterm_at(tmp_path / "stored", 4)
    _run(tiny_llama, path, tmp_path / "stored", method="full", kto={"reference": "precomputed"}, max_steps=8)
    watcher.join(timeout=5)
    assert (tmp_path / "stored" / "STOPPED").exists()
    _run(tiny_llama, path, tmp_path / "stored", method="full", kto={"reference": "precomputed"}, max_steps=8)
    a, b = ([r["loss"] for r in _records(run)] for run in (copy, tmp_path / "stored"))
    assert len(a) == len(b) == 8 and max(a) - min(a) > 1e-4
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)


def test_a_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(tiny_llama, tmp_path):
    """Stopped by SIGTERM at step 3 and run again, a KTO run ends bitwise as the run never stopped."""
    from test_checkpoint import assert_resume_is_bitwise

    path = write_jsonl(tmp_path / "rows.jsonl", feedback(32))
    assert_resume_is_bitwise(lambda run_dir: _run(tiny_llama, path, run_dir, micro_batch_size=4, save_steps=2), tmp_path)


@pytest.mark.multiprocess
def test_two_processes_match_one_under_every_strategy(tiny_llama, tmp_path):
    """The step's KL point and row mean over every rank: 2 processes give one process's loss trace
    (12 steps, 1e-5 relative) under ddp, zero2, zero3 and fsdp2 (LoRA: the adapter-disabled reference)."""
    from test_distributed import objective_matches_one_process, objective_recipe

    recipe = objective_recipe(tiny_llama, write_jsonl(tmp_path / "rows.jsonl", feedback(120)), "unpaired", "kto", 12)
    objective_matches_one_process(recipe, tmp_path, ("ddp", "zero2", "zero3", "fsdp2"), "kto")
