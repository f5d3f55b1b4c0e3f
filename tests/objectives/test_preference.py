"""Preference objectives: ftl's DPO, IPO, SimPO and ORPO against TRL's trainers (the oracle), the
masks of preference rows, and preference runs through the real training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.recipe.schema import DataSection, DataSource
from ftl.recipe.load import validate_recipe
from ftl.data.sources import tokenize_row
from ftl.errors import DataError
from ftl.objectives import build as build_objective
from ftl.objectives.batch import IGNORE_INDEX, Tokens
from ftl.objectives.preference import Pairs, collate_pairs
from conftest import make_recipe, write_jsonl

ROWS = [
    {"prompt": "The sky is", "chosen": " blue and wide.", "rejected": " green."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, or maybe six."},
    {"prompt": "Write a word:", "chosen": " hello", "rejected": " goodbye forever"},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome is the capital."},
]
# (ftl objective, preference settings) -> (TRL trainer, its config)
CASES = {
    "dpo-sigmoid": ("dpo", {"beta": 0.1}, "dpo", {"beta": 0.1, "loss_type": ["sigmoid"]}),
    "dpo-hinge": ("dpo", {"beta": 0.3, "loss_type": "hinge"}, "dpo", {"beta": 0.3, "loss_type": ["hinge"]}),
    "dpo-robust": ("dpo", {"beta": 0.2, "loss_type": "robust", "label_smoothing": 0.1}, "dpo",
                   {"beta": 0.2, "loss_type": ["robust"], "label_smoothing": 0.1}),
    "ipo": ("ipo", {"beta": 0.5}, "dpo", {"beta": 0.5, "loss_type": ["ipo"]}),
    "simpo": ("simpo", {"beta": 2.0, "simpo_gamma": 0.7}, "cpo", {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.7}),
    "orpo": ("orpo", {"orpo_alpha": 0.3}, "orpo", {"beta": 0.3}),
}


def _policy(tiny_llama: Path) -> torch.nn.Module:
    """A fresh LoRA model (B = 0: the policy starts as the base, which is the reference)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))


def _move(model: torch.nn.Module) -> None:
    """Train the adapter a little (B != 0), so the policy differs from the reference. (After TRL's
    trainer is built: TRL keeps a copy of the starting adapter as its reference.)"""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(0, 0.02)


def _trl_trainer(kind: str, config: dict, model, tokenizer, tmp_path: Path):
    common = {"output_dir": str(tmp_path / "trl"), "use_cpu": True, "report_to": [], "per_device_train_batch_size": len(ROWS),
              "bf16": False, "max_length": 512}
    data = Dataset.from_list(ROWS)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, args=DPOConfig(**common, **config), train_dataset=data, processing_class=tokenizer)
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer(model=model, args=CPOConfig(**common, **config), train_dataset=data, processing_class=tokenizer)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(model=model, args=ORPOConfig(**common, **config), train_dataset=data, processing_class=tokenizer)


def _as_ftl_batch(kind: str, batch: dict) -> Pairs:
    """TRL's collated pairs as ftl's batch: the chosen sequences, then the rejected, labels on the responses."""
    if kind == "dpo":
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        return Pairs(Tokens(batch["input_ids"], labels, token_mask=batch["attention_mask"], attention_mask=batch["attention_mask"]),
                     len(ROWS))
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        sides = [torch.nn.functional.pad(batch[f"{side}_{key}"], (0, width - batch[f"{side}_{key}"].shape[1]), value=fill)
                 for side in ("chosen", "rejected")]
        out[key] = torch.cat(sides)
    return Pairs(Tokens(out["input_ids"], out["labels"], token_mask=out["attention_mask"], attention_mask=out["attention_mask"]),
                 len(ROWS))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_and_gradients_equal_trls(tiny_llama, tmp_path, case):
    """On the same model, adapter and batch, ftl's loss and gradients equal TRL's (float32, 1e-5)."""
    objective, settings, kind, config = CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = _policy(tiny_llama)
    trainer = _trl_trainer(kind, config, model, tokenizer, tmp_path)
    _move(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    model.train()
    model.zero_grad()
    if kind == "orpo":
        # TRL's ORPO takes its NLL term over prompt and response ("computed over the full prompt and response");
        # ftl over the response, as the paper's L_SFT and every other ftl objective: TRL's odds-ratio term, and
        # the response NLL by its definition.
        chosen_logps, rejected_logps, chosen_logits = trainer.concatenated_forward(model, batch)[:3]
        labels = _as_ftl_batch(kind, batch).tokens.labels[: len(ROWS), 1:]
        response_nll = torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]), labels.reshape(-1))
        trl_loss = response_nll - trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0].mean()
    else:
        trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = _grads(model)

    recipe = validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run",
                                         data={"train": {"path": str(tmp_path / "x.jsonl"), "format": "preference"}},
                                         method={"objective": objective}, preference=settings))
    ours = build_objective(recipe, tokenizer.pad_token_id)
    ftl_batch = _as_ftl_batch(kind, batch)
    ours.begin_step(model, [ftl_batch], lambda t: t)
    model.zero_grad()
    ftl_loss = ours.loss_sum(model, ftl_batch) / ours.targets(ftl_batch)
    ftl_loss.backward()
    ftl_grads = _grads(model)

    assert abs(ftl_loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item())), (ftl_loss.item(), trl_loss.item())
    assert set(ftl_grads) == set(trl_grads) and ftl_grads
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ftl_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # The comparison can fail: another beta (or alpha) gives another loss.
    key = "orpo_alpha" if objective == "orpo" else "beta"
    other = validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run",
                                        data={"train": {"path": str(tmp_path / "x.jsonl"), "format": "preference"}},
                                        method={"objective": objective}, preference={**settings, key: settings.get(key, 0.1) * 3}))
    changed = build_objective(other, tokenizer.pad_token_id)
    changed.begin_step(model, [ftl_batch], lambda t: t)
    with torch.no_grad():
        assert abs(changed.loss_sum(model, ftl_batch).item() / len(ROWS) - trl_loss.item()) > 1e-4


def test_text_rows_tokenize_as_trl_does(tiny_llama, tmp_path):
    """Prompt and response tokenized together, the response from where they diverge, EOS appended."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=_policy(tiny_llama), processing_class=tokenizer, train_dataset=Dataset.from_list(ROWS),
                         args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=512, bf16=False))
    cfg = DataSection(train=[{"path": "x", "format": "preference"}])
    for i, row in enumerate(ROWS):
        ours = tokenize_row(row, DataSource(path="x", format="preference"), tokenizer, cfg, f"x: row {i}")
        theirs = trainer.train_dataset[i]
        assert ours["input_ids"] == theirs["prompt_ids"] + theirs["chosen_ids"]
        assert ours["rejected_input_ids"] == theirs["prompt_ids"] + theirs["rejected_ids"]
        n = len(theirs["prompt_ids"])
        assert ours["labels"] == [IGNORE_INDEX] * n + theirs["chosen_ids"]
        assert ours["rejected_labels"][-1] == tokenizer.eos_token_id  # EOS trained on each side


def test_chat_rows_train_exactly_the_reply_and_its_end_of_turn(artifacts):
    """Chat preference rows on a real template (Llama 3.1): the prompt's tokens, system and history
    included, carry no loss; each reply and its <|eot_id|> do."""
    tokenizer = AutoTokenizer.from_pretrained(artifacts / "tokenizers" / "llama3.1")
    from ftl.models.tokenizer import set_pad_token

    set_pad_token(tokenizer)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    row = {"prompt": prompt, "chosen": {"role": "assistant", "content": "Paris."},
           "rejected": [{"role": "assistant", "content": "Rome, I think."}]}
    out = tokenize_row(row, DataSource(path="x", format="preference"), tokenizer,
                       DataSection(train=[{"path": "x", "format": "preference"}]), "x: row 0")
    for ids, labels, reply in ((out["input_ids"], out["labels"], "Paris."),
                               (out["rejected_input_ids"], out["rejected_labels"], "Rome, I think.")):
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == reply + "<|eot_id|>"
        assert labels[-len(trained):] == ids[-len(trained):] and labels[: -len(trained)] == [IGNORE_INDEX] * (len(ids) - len(trained))
        assert tokenizer.decode(ids[: -len(trained)]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    batch = collate_pairs([out], tokenizer.pad_token_id)
    assert batch.tokens.input_ids.shape[0] == 2  # the chosen side, then the rejected


def test_invalid_pairs_are_errors_or_dropped_and_counted(tiny_llama, tmp_path, caplog):
    from ftl.data.sources import build_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS[:2] + [{"prompt": "Same", "chosen": " answer", "rejected": " answer"}])
    source = DataSource(path=str(path), format="preference")
    with pytest.raises(DataError, match=r"pairs.jsonl: row 2: chosen and rejected are the same tokens; .*invalid_pairs: drop"):
        build_dataset([source], tokenizer, DataSection(train=[source]))
    stats: list[dict] = []
    kept = build_dataset([source], tokenizer, DataSection(train=[source], invalid_pairs="drop"), stats=stats)
    assert len(kept) == 2 and stats[0]["dropped"] == {"chosen and rejected are the same tokens": 1}
    with pytest.raises(DataError, match=r"row 0: missing field 'rejected'"):
        tokenize_row({"prompt": "a", "chosen": "b"}, source, tokenizer, DataSection(train=[source]), "x: row 0")


def test_recipe_rules(tiny_llama, tmp_path):
    from ftl.recipe.schema import RecipeError

    def recipe(**sections):
        return validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run", **sections))

    preference_data = {"train": {"path": str(tmp_path / "x.jsonl"), "format": "preference"}}
    with pytest.raises(RecipeError, match=r"data\.train\.0\.format: .*use format: preference"):
        recipe(method={"objective": "dpo"})
    with pytest.raises(RecipeError, match=r"data\.train\.0\.format: preference rows need method.objective"):
        recipe(data=preference_data)
    with pytest.raises(RecipeError, match=r"preference\.simpo_gamma: applies to method.objective simpo, not dpo"):
        recipe(data=preference_data, method={"objective": "dpo"}, preference={"simpo_gamma": 1.0})
    with pytest.raises(RecipeError, match=r"preference\.beta: applies to method.objective dpo or ipo or simpo, not sft"):
        recipe(preference={"beta": 0.5})
    with pytest.raises(RecipeError, match=r"data\.streaming: not available with method.objective dpo"):
        recipe(data={**preference_data, "streaming": True}, method={"objective": "dpo"}, train={"max_steps": 2})
    with pytest.raises(RecipeError, match=r"preference\.reference: LoRA and QLoRA use the base model"):
        recipe(data=preference_data, method={"objective": "dpo"}, preference={"reference": "model"})
    assert recipe(data=preference_data, method={"objective": "orpo", "type": "full"}).method.objective == "orpo"


def _pairs(n: int) -> list[dict]:
    """A task the base model does not know: answer with the word's category, not a random word."""
    words = {"apple": "fruit", "pear": "fruit", "dog": "animal", "cat": "animal", "red": "color", "blue": "color"}
    wrong = {"fruit": "animal", "animal": "color", "color": "fruit"}
    items = sorted(words.items())
    return [{"prompt": f"Category of {w}:", "chosen": f" {c}", "rejected": f" {wrong[c]}"} for w, c in (items * n)[:n]]


@pytest.mark.parametrize("objective, method", [("dpo", "lora"), ("dpo", "full"), ("simpo", "lora"), ("orpo", "lora")])
def test_preference_runs_learn_and_log_their_metrics(tiny_llama, tmp_path, objective, method):
    """Through the real loop: the loss falls, reward accuracy rises, metrics.jsonl has the rewards."""
    from ftl.train import train

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))
    recipe = validate_recipe(make_recipe(
        tiny_llama, path, tmp_path / "run", path, data={"train": {"path": str(path), "format": "preference"},
                                                         "eval": {"path": str(path), "format": "preference"}},
        method={"type": method, "objective": objective, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        train={"max_steps": 12, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3 if method == "lora" else 1e-3,
               "logging_steps": 4, "eval_steps": 12, "seed": 0}))
    summary = train(recipe)
    assert summary.final_eval_loss < summary.initial_eval_loss
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_accuracy" in r]
    assert len(steps) == 3 and {"rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen", "logps_rejected"} <= set(steps[0])
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    if objective == "dpo":
        from ftl.evaluate import preference_accuracy
        from ftl.export.write import export

        source = DataSource(path=str(path), format="preference")
        measured = preference_accuracy(summary.checkpoint, source)
        if method == "lora":  # the demo's held-out measure: against the adapter disabled (the reference)
            assert measured["rows"] == 48 and measured["reward_accuracy"] > 0.5
        # The policy exports (merged, verified against the trained model) and prefers as it did in training.
        report = export(tmp_path / "run", tmp_path / "export")
        assert report["passed"] and report["mode"] == method
        exported = preference_accuracy(tmp_path / "export", source)
        assert exported["likelihood_accuracy"] == measured["likelihood_accuracy"] > 0.5


def _varied_pairs(n: int) -> list[dict]:
    """Pairs of unequal lengths (prompts of 0-6 extra words, responses of 1-3), so padding would matter."""
    return [{**row, "prompt": "please " * (i % 7) + row["prompt"], "chosen": row["chosen"] * (1 + i % 3),
             "rejected": row["rejected"] * (1 + (i + 1) % 3)} for i, row in enumerate(_pairs(n))]


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_packed_pairs_give_the_padded_loss_and_gradients(tiny_llama, tmp_path, objective):
    """data.packing: a micro-batch's 2N sequences in one row without padding (position_ids restart,
    transformers' block-diagonal attention) give the loss and gradients of the padded batch, which
    is TRL's (above)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    source, cfg = DataSource(path="x", format="preference"), DataSection(train=[{"path": "x", "format": "preference"}])
    rows = [tokenize_row(row, source, tokenizer, cfg, f"x: row {i}") for i, row in enumerate(_varied_pairs(6))]
    padded, packed = collate_pairs(rows, tokenizer.pad_token_id), collate_pairs(rows, tokenizer.pad_token_id, packed=True)
    assert packed.tokens.input_ids.shape[0] == 1 and packed.tokens.input_ids.shape[1] < padded.tokens.input_ids.numel()
    assert packed.tokens.input_ids.shape[1] == padded.tokens.attention_mask.sum()  # every token real, none left out
    model = _policy(tiny_llama)
    _move(model)
    recipe = validate_recipe(make_recipe(tiny_llama, tmp_path / "x.jsonl", tmp_path / "run",
                                         data={"train": {"path": "x", "format": "preference"}}, method={"objective": objective}))
    results = []
    for batch in (padded, packed):
        ours = build_objective(recipe, tokenizer.pad_token_id)
        ours.begin_step(model, [batch], lambda t: t)
        model.zero_grad()
        loss = ours.loss_sum(model, batch) / ours.targets(batch)
        loss.backward()
        results.append((loss.item(), _grads(model), ours.take_metrics(lambda t: t)))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert abs(loss_a - loss_b) <= 1e-5 * max(1.0, abs(loss_a)), (loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    for key, value in metrics_a.items():
        assert metrics_b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_packed_dpo_run_traces_the_padded_one(tiny_llama, tmp_path, monkeypatch):
    """Through the real loop, with eval and a precomputed reference: packing changes no loss (1e-5)."""
    import ftl.objectives.batch as batches

    packed_batches = []
    pack = batches.pack_sequences
    monkeypatch.setattr(batches, "pack_sequences", lambda sequences: packed_batches.append(len(sequences)) or pack(sequences))
    path = write_jsonl(tmp_path / "pairs.jsonl", _varied_pairs(48))
    for reference in ("auto", "precomputed"):
        padded = _run(tiny_llama, path, tmp_path / f"padded-{reference}", "dpo", preference={"reference": reference},
                      max_steps=8, eval_steps=8)
        packed = _run(tiny_llama, path, tmp_path / f"packed-{reference}", "dpo", preference={"reference": reference},
                      max_steps=8, eval_steps=8, packing=True)
        a, b = _trace(padded), _trace(packed)
        assert len(a) == 8 and max(a) - min(a) > 1e-3  # the policy moved
        for x, y in zip(a, b, strict=True):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)
        assert packed_batches and set(packed_batches) == {16}  # 8 pairs per micro-batch in one row
        packed_batches.clear()
        evals = [[json.loads(line)["eval_loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
                 for run in (padded, packed)]
        assert evals[1] == pytest.approx(evals[0], rel=1e-5)


def _run(tiny_llama: Path, path: Path, run_dir: Path, objective: str, method: str = "lora", preference: dict | None = None,
         packing: bool = False, **train_cfg) -> Path:
    from ftl.train import train

    cfg = {"max_steps": 6, "micro_batch_size": 8, "learning_rate": 5e-3 if method == "lora" else 1e-3, "logging_steps": 1,
           "seed": 0, **train_cfg}
    train(validate_recipe(make_recipe(
        tiny_llama, path, run_dir, path, data={"train": {"path": str(path), "format": "preference"},
                                               "eval": {"path": str(path), "format": "preference"}, "packing": packing},
        method={"type": method, "objective": objective, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        preference=preference or {}, train=cfg)))
    return run_dir


def _trace(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_gradient_accumulation_equals_one_big_batch(tiny_llama, tmp_path, objective):
    """Micro-batch 2 x 4 accumulation = micro-batch 8: the mean is over the step's pairs (ORPO's NLL
    over the step's chosen tokens), not over each micro-batch."""
    from safetensors.torch import load_file

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))
    big = _run(tiny_llama, path, tmp_path / "big", objective)
    small = _run(tiny_llama, path, tmp_path / "small", objective, micro_batch_size=2, gradient_accumulation_steps=4)
    for a, b in zip(_trace(big), _trace(small), strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (_trace(big), _trace(small))
    wa, wb = (load_file(run / "checkpoints" / "step-6" / "adapter_model.safetensors") for run in (big, small))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_stopped_and_resumed_dpo_run_is_bitwise_identical(tiny_llama, tmp_path):
    from test_checkpoint import _sigterm_at

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))
    straight = _run(tiny_llama, path, tmp_path / "straight", "dpo", max_steps=16)
    watcher = _sigterm_at(tmp_path / "stopped", 7)
    _run(tiny_llama, path, tmp_path / "stopped", "dpo", max_steps=16)
    watcher.join(timeout=5)
    assert (tmp_path / "stopped" / "STOPPED").exists()
    _run(tiny_llama, path, tmp_path / "stopped", "dpo", max_steps=16)
    assert len(_trace(straight)) == 16 and _trace(tmp_path / "stopped") == _trace(straight)


# (strategy, preference.reference) per method; full: the frozen reference copy sharded as the policy.
# (ZeRO-1 places the policy, reference and gradients as ZeRO-2 does; test_distributed covers its optimizer.)
# The adapter-disabled reference under DDP and ZeRO-2 is KTO's too (tests/objectives/test_kto.py runs it under
# all four strategies); here the sharded engines, where the reference is gathered with the policy.
PARITY = {"lora": [(s, "auto") for s in ("zero3", "fsdp2")], "qlora": [("ddp", "auto")],
          "full": [(s, "model") for s in ("ddp", "zero3", "fsdp2")] + [("zero3", "precomputed")]}
STEPS = 20


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", sorted(PARITY))
def test_dpo_on_two_processes_matches_one(tiny_llama, tmp_path, method):
    """The reference (LoRA: the adapter disabled; full: a frozen copy, sharded under ZeRO-3 and FSDP2,
    or precomputed) and the pair mean under every strategy: 2 processes give one process's loss
    trace (20 steps, 1e-5 relative)."""
    from test_distributed import assert_same_trace, free_port, losses
    from conftest import ftl_train, write_yaml
    from ftl.train import train

    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(160))

    def recipe(run_dir: Path, processes: int, strategy: str, reference: str) -> dict:
        lora = {"r": 8, "alpha": 16, "dropout": 0.0}
        return make_recipe(
            tiny_llama, path, run_dir, data={"train": {"path": str(path), "format": "preference"}},
            method={"type": method, "objective": "dpo", "lora": lora}, preference={"reference": reference},
            quantization={"compute_dtype": "float32", "quant_storage": "float32"} if method == "qlora" else {},
            train={"max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": 4 // processes,
                   "learning_rate": 5e-3 if method != "full" else 1e-3,
                   "logging_steps": 1, "seed": 0, "lr_scheduler": "linear"},
            distributed={"num_processes": processes, "strategy": strategy, "main_process_port": free_port()})

    train(validate_recipe(recipe(tmp_path / "single", 1, "single", "auto")))
    reference = losses(tmp_path / "single")
    assert len(reference) == STEPS and reference[STEPS] < reference[1]
    for strategy, ref in PARITY[method]:
        name = f"{strategy}-{ref}"
        config = write_yaml(tmp_path / f"{name}.yaml", recipe(tmp_path / name, 2, strategy, ref))
        assert ftl_train(str(config)) == 0
        assert_same_trace(reference, losses(tmp_path / name), f"{method} dpo/{name}")


def test_demo_pairs_are_valid_preference_rows_of_the_real_chat_template(artifacts, tmp_path):
    """ftl demo --objective dpo: right and swapped answers, the same prompt, rendered by SmolLM2's template."""
    from ftl.data.sources import build_dataset
    from ftl.data.demo import write_preference_data

    paths = write_preference_data(tmp_path, n_train=20, n_eval=5)
    tokenizer = AutoTokenizer.from_pretrained(artifacts / "models" / "smollm2-135m-instruct")
    source = DataSource(path=str(paths["eval"]), format="preference")
    rows = build_dataset([source], tokenizer, DataSection(train=[source]))
    assert len(rows) == 5
    chosen = tokenizer.decode([t for t in rows[0]["labels"] if t != IGNORE_INDEX])
    rejected = tokenizer.decode([t for t in rows[0]["rejected_labels"] if t != IGNORE_INDEX])
    right = json.loads(chosen.removesuffix("<|im_end|>"))
    assert json.loads(rejected.removesuffix("<|im_end|>")) == {"name": right["city"], "city": right["name"]}
    wrong = json.loads(paths["wrong"].read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in wrong] == ["user", "assistant"]


@pytest.mark.parametrize("method, reference", [("full", "model"), ("lora", "auto")])
def test_precomputed_reference_gives_the_same_trace(tiny_llama, tmp_path, method, reference):
    """One pass before training stores the reference log-probabilities with the preprocessed data;
    the run then holds no reference (full: no copy) and its loss trace is the reference run's."""
    path = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))
    live = _run(tiny_llama, path, tmp_path / "live", "dpo", method, {"reference": reference}, max_steps=8, eval_steps=8)
    stored = _run(tiny_llama, path, tmp_path / "stored", "dpo", method, {"reference": "precomputed"}, max_steps=8, eval_steps=8)
    a, b = _trace(live), _trace(stored)
    assert len(a) == 8 and all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert list((tmp_path / "stored" / "data").rglob("reference-logps-*.pt"))
    # resumed, the stored log-probabilities are read back (the model is no longer the reference)
    again = _run(tiny_llama, path, tmp_path / "stored", "dpo", method, {"reference": "precomputed"}, max_steps=10)
    assert len(_trace(again)) == 10 and _trace(again)[:8] == b
