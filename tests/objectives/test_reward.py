"""Reward models: ftl's Bradley-Terry loss on a score head against TRL's RewardTrainer (the oracle),
and reward-model runs through the real loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftl.recipe.schema import DataSection, DataSource
from ftl.recipe.load import validate_recipe
from ftl.data.sources import build_dataset
from ftl.objectives import build as build_objective
from ftl.objectives.batch import Tokens
from ftl.objectives.reward import ScoredPairs, collate_scored
from conftest import make_recipe, write_jsonl
from test_preference import _grads, _pairs

ROWS = [
    {"prompt": "The sky is", "chosen": " blue and wide.", "rejected": " green.", "margin": 1.0},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, or maybe six.", "margin": 0.5},
    {"prompt": "Write a word:", "chosen": " hello", "rejected": " goodbye forever", "margin": 0.0},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome is the capital.", "margin": 2.0},
]
PAIRS = {"train": {"path": "x.jsonl", "format": "preference"}}


def _scorer(tiny_llama: Path, tokenizer) -> torch.nn.Module:
    """A LoRA reward model as ftl builds it: a seeded score head trained whole beside the adapters."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("center, margin, dtype", [(0.0, False, torch.float32), (0.01, False, torch.float32),
                                                   (0.0, True, torch.float32), (0.01, True, torch.float32),
                                                   (0.01, True, torch.bfloat16)])
def test_loss_gradients_and_accuracy_equal_trls(tiny_llama, tmp_path, center, margin, dtype):
    """On the same model, adapter, head and batch: ftl's reward loss, gradients and accuracy equal
    TRL's (1e-5), with and without margins and centering, in float32 and in bf16 (the recipe's default
    weights and compute); another coefficient fails."""
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = _scorer(tiny_llama, tokenizer).to(dtype)
    rows = ROWS if margin else [{k: v for k, v in row.items() if k != "margin"} for row in ROWS]
    args = RewardConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], per_device_train_batch_size=len(rows),
                        bf16=False, max_length=512, center_rewards_coefficient=center or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train()
    model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    trl_grads = _grads(model)
    trl_accuracy = trainer._metrics["train"]["accuracy"][-1]

    recipe = validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", data=PAIRS,
                                         method={"objective": "reward"}, reward={"center_rewards_coefficient": center}))
    ours = build_objective(recipe, tokenizer.pad_token_id)
    mask = batch["attention_mask"]
    ftl_batch = ScoredPairs(Tokens(batch["input_ids"], batch["input_ids"], token_mask=mask, attention_mask=mask),
                            batch["margin"] if margin else torch.zeros(len(rows)))
    model.zero_grad()
    ftl_loss = ours.loss_sum(model, ftl_batch) / ours.targets(ftl_batch)
    ftl_loss.backward()
    ftl_grads = _grads(model)

    # In bf16 the two round the scores' loss and its gradient at other places (measured: 1.2e-5 of the
    # loss; bf16 gradients within 2.2% of each tensor's largest entry).
    rtol = 1e-5 if dtype == torch.float32 else 1e-4
    assert abs(ftl_loss.item() - trl_loss.item()) <= rtol * max(1.0, abs(trl_loss.item())), (ftl_loss.item(), trl_loss.item())
    assert ours.take_metrics(lambda t: t)["reward_accuracy"] == pytest.approx(trl_accuracy, abs=1e-6)
    assert set(ftl_grads) == set(trl_grads) and any("score" in name for name in ftl_grads)
    for name, grad in trl_grads.items():
        if dtype == torch.float32:
            torch.testing.assert_close(ftl_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert (ftl_grads[name].float() - grad.float()).abs().max() <= 0.05 * grad.float().abs().max(), name
    other = validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", data=PAIRS,
                                        method={"objective": "reward"}, reward={"center_rewards_coefficient": center + 0.5}))
    with torch.no_grad():
        changed = build_objective(other, tokenizer.pad_token_id).loss_sum(model, ftl_batch) / len(rows)
    assert abs(changed.item() - trl_loss.item()) > 1e-4


def test_rows_tokenize_as_trl_does_with_their_margins(tiny_llama, tmp_path):
    """Each side is prompt and response tokenized together with EOS, as TRL's reward data; the margin
    field reaches the batch."""
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    trainer = RewardTrainer(model=_scorer(tiny_llama, tokenizer), train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
                            args=RewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=512, bf16=False))
    source = DataSource(path=str(write_jsonl(tmp_path / "rows.jsonl", ROWS)), format="preference")
    ours = build_dataset([source], tokenizer, DataSection(train=[source]))
    for i in range(len(ROWS)):
        assert ours[i]["input_ids"] == trainer.train_dataset[i]["chosen_ids"]
        assert ours[i]["rejected_input_ids"] == trainer.train_dataset[i]["rejected_ids"]
    batch = collate_scored([ours[i] for i in range(len(ROWS))], tokenizer.pad_token_id)
    assert batch.margin.tolist() == [row["margin"] for row in ROWS] and batch.tokens.input_ids.shape[0] == 2 * len(ROWS)


def _run(tiny_llama: Path, path: Path, run_dir: Path, method: str = "lora", **train_cfg) -> Path:
    from ftl.train import train

    cfg = {"max_steps": 8, "micro_batch_size": 8, "learning_rate": 5e-3 if method == "lora" else 1e-3, "logging_steps": 1,
           "seed": 0, **train_cfg}
    train(validate_recipe(make_recipe(tiny_llama, path, run_dir, path, data={"train": {"path": str(path), "format": "preference"},
                                                                              "eval": {"path": str(path), "format": "preference"}},
                                      method={"type": method, "objective": "reward", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                                      train=cfg)))
    return run_dir


def test_a_reward_run_learns_and_accumulation_equals_one_big_batch(tiny_llama, tmp_path):
    """The score head learns to rank the right category first; micro-batch 2 x 4 = micro-batch 8."""
    from safetensors.torch import load_file
    from test_checkpoint import assert_accumulation_equals_one_batch

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))
    # (Adam divides by the gradients' RMS: where one is near 0, float32 sums' order shows, ~1e-5)
    records = assert_accumulation_equals_one_batch(lambda run_dir, **cfg: _run(tiny_llama, path, run_dir, **cfg), tmp_path, atol=1e-4)
    a, big = [r["loss"] for r in records], tmp_path / "big"
    assert any("score" in key for key in load_file(next((big / "checkpoints").glob("step-*")) / "adapter_model.safetensors"))  # the head is saved
    last = records[-1]
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"} <= set(last)
    evals = [json.loads(line)["eval_loss"] for line in (big / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert a[-1] < a[0] and evals[-1] < evals[0] - 0.05, evals


def test_a_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(tiny_llama, tmp_path):
    """Stopped by SIGTERM at step 3 and run again, a reward-model run ends bitwise as the run never stopped."""
    from test_checkpoint import assert_resume_is_bitwise

    path = write_jsonl(tmp_path / "rows.jsonl", _pairs(32))
    assert_resume_is_bitwise(lambda run_dir: _run(tiny_llama, path, run_dir, micro_batch_size=4, save_steps=2), tmp_path)


def test_recipe_rules(tiny_llama, tmp_path):
    from ftl.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match=r"data\.packing: a reward model scores each sequence at its last token"):
        validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", method={"objective": "reward"},
                                    data={**PAIRS, "packing": True}))
    with pytest.raises(RecipeError, match=r"reward\.center_rewards_coefficient: applies to method.objective reward, not dpo"):
        validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", method={"objective": "dpo"},
                                    data=PAIRS, reward={"center_rewards_coefficient": 0.01}))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_export_scores_as_trained_and_loads_as_a_sequence_classifier(tiny_llama, tmp_path, method):
    """``ftl export`` of a reward run (the recipe's defaults: a bf16 export) writes a model that
    ``AutoModelForSequenceClassification`` loads and that scores rows as the trained model did; its
    verification passes and still catches a wrong head."""
    from ftl.export.write import export
    from ftl.models.build import load_for_inference

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(24))
    run = _run(tiny_llama, path, tmp_path / "run", method=method, max_steps=4)
    report = export(run)
    assert report["passed"] and report["verified"], report
    out = Path(report["out"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    trained, _ = load_for_inference(run / "checkpoints" / "step-4")
    rows = build_dataset([DataSource(path=str(path), format="preference")], tokenizer,
                         DataSection(train=[{"path": str(path), "format": "preference"}]))
    batch = collate_scored([rows[i] for i in range(6)], tokenizer.pad_token_id)
    with torch.no_grad():
        want = trained(**batch.tokens.inputs()).logits.squeeze(-1)
        got = exported(**batch.tokens.inputs()).logits.squeeze(-1)
    assert want.std() > 0 and (got - want).abs().max() <= 0.05 * want.std() + 1e-3  # bf16 weights
    # The verification can fail: the merge with its score head 10% off is refused.
    from ftl.recipe.load import load_recipe
    from ftl.export.verify import verify_export
    from ftl.export.merge import Merge, TensorSource
    from safetensors.torch import load_file

    tensors = {k: v for shard in out.glob("model*.safetensors") for k, v in load_file(shard).items()}
    tensors["score.weight"] = tensors["score.weight"] * 1.1
    recipe = load_recipe(run / "run.yaml")
    bad = verify_export(out, run / "checkpoints" / "step-4", recipe, recipe.export, report["mode"],
                        Merge(TensorSource.from_state_dict(tensors)), [rows[i]["input_ids"] for i in range(4)], "score")
    assert not bad["passed"] and bad["merge_max_abs_logit_diff"] > bad["merge_tolerance"]


def test_ftl_eval_reports_the_pairwise_accuracy_the_run_logged(tiny_llama, tmp_path, capsys):
    """``ftl eval RUN pairs.jsonl`` on a reward run: the share of pairs whose chosen side scores higher,
    equal to the accuracy computed from the checkpoint's own scores."""
    from conftest import cli_exit_code
    from ftl.models.build import load_for_inference

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(24))
    run = _run(tiny_llama, path, tmp_path / "run", max_steps=4)
    assert cli_exit_code(["eval", str(run), "--data", str(path)]) == 0
    printed = capsys.readouterr().out
    shown = float(printed.split("pairwise accuracy:")[1].split("%")[0]) / 100
    model, tokenizer = load_for_inference(run / "checkpoints" / "step-4")
    rows = build_dataset([DataSource(path=str(path), format="preference")], tokenizer,
                         DataSection(train=[{"path": str(path), "format": "preference"}]))
    batch = collate_scored([rows[i] for i in range(len(rows))], tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = model(**batch.tokens.inputs()).logits.squeeze(-1)
    n = len(rows)
    assert shown == pytest.approx((rewards[:n] > rewards[n:]).float().mean().item(), abs=1e-3)


@pytest.mark.multiprocess
def test_two_processes_match_one_under_every_strategy(tiny_llama, tmp_path):
    """The pair mean over every rank, the score head trained whole beside the adapters (gathered under
    ZeRO-3, sharded under FSDP2): 2 processes give one process's loss trace (10 steps, 1e-5)."""
    from test_distributed import objective_matches_one_process, objective_recipe

    recipe = objective_recipe(tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", _pairs(96)), "preference", "reward", 10)
    objective_matches_one_process(recipe, tmp_path, ("ddp", "zero2", "zero3", "fsdp2"), "reward")
