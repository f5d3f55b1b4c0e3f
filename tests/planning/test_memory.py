"""The memory estimate against hand computations, and the strategy/micro-batch choice it drives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import load_recipe, validate_recipe
from ftl.planning.memory import GIB, Shape, autofit, estimate, micro_batch_options, model_shape
from conftest import make_recipe

ROOT = Path(__file__).resolve().parents[2]
# 2 layers of hidden 64, GQA (4 heads, 2 kv heads of 16), MLP 128, vocab 100, untied.
SHAPE = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=100, tied=False)
# Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 64x128 = 36,864; two layers 73,728.
# Embeddings and lm_head 2 x 100 x 64 = 12,800; norms (2 x 2 + 1) x 64 = 320.
PSI = 73_728 + 12_800 + 320


def recipe_for(tmp_path: Path, **sections):
    return validate_recipe(make_recipe(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "run", **sections))


def test_parameter_count_by_hand():
    assert SHAPE.linear_params == 73_728 and SHAPE.params == PSI


def test_shape_matches_a_real_model_and_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    shape = model_shape(str(tiny_llama))
    assert shape.params == sum(p.numel() for p in model.parameters())
    recipe = validate_recipe(make_recipe(tiny_llama, tiny_llama / "x.jsonl", tiny_llama / "run", method={"type": "lora", "lora": {"r": 8}}))
    lora_bytes = estimate(recipe, shape).gradients * GIB  # fp32 adapters: 4 bytes each
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert lora_bytes / 4 == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("strategy, weights, gradients, optimizer", [
    # The ZeRO paper's mixed-precision Adam: 2 + 2 + 12 bytes per parameter, sharded by stage.
    ("zero1", 2, 2, 12 / 8),
    ("zero2", 2, 2 / 8, 12 / 8),
    ("zero3", 2 / 8, 2 / 8, 12 / 8),
])
def test_zero_stages_give_the_papers_bytes_per_parameter(tmp_path, strategy, weights, gradients, optimizer):
    recipe = recipe_for(tmp_path, method={"type": "full"}, model={"path": "x", "dtype": "bfloat16"},
                        train={"mixed_precision": "bf16"}, distributed={"strategy": strategy, "num_processes": 8})
    result = estimate(recipe, SHAPE)
    gathered = 2 * (SHAPE.linear_params / SHAPE.layers) * 2 if strategy == "zero3" else 0  # two bf16 layers
    assert result.weights * GIB == pytest.approx(weights * PSI + gathered)
    assert result.gradients * GIB == pytest.approx(gradients * PSI)
    assert result.optimizer * GIB == pytest.approx(optimizer * PSI)
    no_sharding = estimate(recipe, SHAPE, strategy="zero1")  # N=8 but weights and grads whole
    assert (no_sharding.weights + no_sharding.gradients) * GIB + no_sharding.optimizer * GIB * 8 == pytest.approx(16 * PSI)


def test_offload_moves_the_optimizer_to_cpu(tmp_path):
    recipe = recipe_for(tmp_path, method={"type": "full"}, train={"mixed_precision": "bf16"},
                        distributed={"strategy": "zero3", "num_processes": 4, "zero": {"offload_optimizer": True}})
    result = estimate(recipe, SHAPE)
    assert result.optimizer == 0 and result.cpu * GIB == pytest.approx(12 * PSI / 4)


def test_qlora_weights_by_hand(tmp_path):
    recipe = recipe_for(tmp_path, method={"type": "qlora", "lora": {"r": 8, "dropout": 0.0}},
                        quantization={"double_quant": True}, train={"optimizer": "adamw_torch"})
    result = estimate(recipe, SHAPE)
    # LoRA r=8 on all seven linears: 8 x (in + out) = 1024 + 768 + 768 + 1024 + 3 x 1536 = 8192 per layer.
    lora = 2 * 8192
    nf4_dq_bits = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits: 8-bit absmax per 64, fp32 scale per 256 blocks
    frozen = 73_728 * nf4_dq_bits / 8 + (12_800 + 320) * 4  # embeddings, head and norms upcast to fp32
    assert result.weights * GIB == pytest.approx(frozen + lora * 4)
    assert result.gradients * GIB == pytest.approx(lora * 4) and result.optimizer * GIB == pytest.approx(lora * 8)
    plain = estimate(recipe_for(tmp_path, method={"type": "qlora"}, quantization={"double_quant": False}), SHAPE)
    assert (plain.weights - result.weights) * GIB == pytest.approx(73_728 * (0.5 - (nf4_dq_bits - 4)) / 8)


def test_activations_by_hand(tmp_path):
    """A bf16 full fine-tune (SHAPE: d=64, q=64, kv=32, i=128, 4 heads of 16, vocab 100), term by term."""
    recipe = recipe_for(tmp_path, method={"type": "full"}, model={"path": "x", "dtype": "bfloat16"},
                        data={"train": {"path": "x"}, "max_length": 32}, train={"micro_batch_size": 2, "mixed_precision": "bf16"})
    tokens, d = 2 * 32, 64
    norm = 4 * d + 4 + 2 * d  # fp32 input, 1/rms, the normalised input the trained weight multiplies
    attention = 2 * (2 * 64 + 2 * 32) + 4 * 4  # q, k, v and the output in bf16, the fp32 log-sum-exp per head
    mlp = 3 * 2 * 128  # gate output, SiLU output, up output
    inputs = 2 * d + 2 * d + 2 * 128  # q/k/v's shared input, gate/up's, down's (o reads the attention output)
    layer = 2 * norm + attention + mlp + inputs
    rest = norm + 2 * d + 2 * 16 * 2  # the final norm, the decoder's output, RoPE's cos and sin
    result = estimate(recipe, SHAPE)
    assert result.activations * GIB == pytest.approx((2 * layer + rest) * tokens)
    assert result.loss * GIB == pytest.approx(tokens * 100 * 12)  # fp32 logits, log-softmax, gradient
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": True})})
    assert estimate(recipe, SHAPE).activations * GIB == pytest.approx((2 * 2 * d + rest) * tokens)  # each layer's input


def test_auto_picks_zero3_or_offload_when_full_fine_tuning_does_not_fit():
    recipe = load_recipe(ROOT / "recipes/llama3.1-8b-full-zero3.yaml", ["distributed.strategy=auto"]).resolved()
    shape = model_shape(recipe.model.path)  # a known hub model: no download
    chosen, result, fits = autofit(recipe, 40, shape)
    assert fits and chosen.distributed.strategy == "zero3" and not chosen.distributed.zero.offload_optimizer
    for cheaper in ("ddp", "zero1", "zero2"):
        assert not estimate(recipe, shape, strategy=cheaper, micro_batch_size=1).fits(40)
    chosen, result, fits = autofit(recipe, 24, shape)  # the reserved estimate decides: 31 GiB without offload
    assert fits and chosen.distributed.strategy == "zero3" and chosen.distributed.zero.offload_optimizer


def test_auto_keeps_qlora_on_one_gpu_and_picks_the_largest_micro_batch():
    recipe = load_recipe(ROOT / "recipes/llama3.1-8b-qlora.yaml", ["distributed.strategy=auto"]).resolved()
    shape = model_shape(recipe.model.path)
    chosen, result, fits = autofit(recipe, 24, shape)
    assert fits and chosen.distributed.strategy == "single"
    mb = chosen.train.micro_batch_size
    assert mb * chosen.train.gradient_accumulation_steps == 16  # the recipe's global batch (2 x 8)
    larger = [m for m in micro_batch_options(recipe) if m > mb]
    assert larger and not estimate(chosen, shape, micro_batch_size=min(larger)).fits(24)


def test_plan_cli_reports_memory_and_fit(tmp_path):
    run = [sys.executable, "-m", "ftl.cli", "plan", str(ROOT / "recipes/llama3.1-8b-qlora.yaml"), "--json"]
    out = subprocess.run(run + ["--gpu-mem", "80GB"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["fits"] is True and report["gpu_memory_gib"] == 80 and report["memory_gib"]["allocated (peak)"] > 5
    memory = report["memory_gib"]
    assert memory["reserved (nvidia-smi)"] > memory["allocated (peak)"] == max(v for k, v in memory.items() if k.startswith("phase "))
    assert report["peak_phase"] in ("forward", "loss", "backward", "optimizer step")
    largest = report["largest_fit"]  # the recipe's micro-batch 2 x 2048 fits 80 GB: larger ones too
    assert largest["micro_batch_size"] >= 2 and largest["max_length"] >= 2048
    small = json.loads(subprocess.run(run + ["--gpu-mem", "4GB"], capture_output=True, text=True, check=True).stdout)
    assert small["fits"] is False
    bad = subprocess.run(run + ["--gpu-mem", "lots"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--gpu-mem 'lots'" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_gpu_memory_in_recipe_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match="distributed.gpu_memory: 'lots' is not a size"):
        recipe_for(tmp_path, distributed={"gpu_memory": "lots"})


def test_train_with_gpu_memory_runs_the_chosen_micro_batch(tmp_path, tiny_llama, demo_data):
    from ftl.cli import main

    recipe = make_recipe(tiny_llama, demo_data[0], tmp_path / "run", distributed={"gpu_memory": "2GB"},
                         train={"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 4})
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    with pytest.raises(SystemExit) as done:
        main(["train", str(path)])
    assert done.value.code == 0
    written = load_recipe(tmp_path / "run" / "run.yaml")
    assert written.train.micro_batch_size == 4 and written.train.gradient_accumulation_steps == 1
    assert torch.cuda.is_available() or written.distributed.strategy == "single"


@pytest.mark.slow
def test_measure_through_proxies_extrapolates_the_direct_measurement(tmp_path, demo_data, monkeypatch):
    """A 4-layer model measured directly and through 1- and 2-layer proxies agree (bytes counted
    tensor by tensor: within 5%), and the estimate is not below the measurement."""
    from ftl.planning import measure as measuring
    from ftl.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "model", "llama", hidden_size=256, layers=4)
    recipe = validate_recipe(make_recipe(model, demo_data[0], tmp_path / "run", data={"train": {"path": str(demo_data[0])}, "max_length": 256},
                                         train={"micro_batch_size": 8}))
    direct = measuring.measure(recipe)
    assert direct["mode"] == "full model" and direct["measured_gib"] > 0
    assert 0.95 <= direct["estimate_gib"] / direct["measured_gib"] <= 1.15
    monkeypatch.setattr(measuring, "_available_gib", lambda: 0.0)  # as if the model were too large here
    proxied = measuring.measure(recipe)
    assert proxied["mode"].startswith("proxies") and proxied["proxy_measured_gib"][1] > proxied["proxy_measured_gib"][0]
    assert proxied["measured_gib"] == pytest.approx(direct["measured_gib"], rel=0.05)


def test_plan_without_a_readable_model_config_still_prints_the_plan(tmp_path):
    run = [sys.executable, "-m", "ftl.cli", "plan", str(ROOT / "recipes/llama3.1-8b-qlora.yaml"), "model.path=some-org/unknown-model"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0 and "memory estimate unavailable" in out.stdout and "model.path" in out.stdout
    refused = subprocess.run(run + ["--gpu-mem", "80GB"], capture_output=True, text=True)
    assert refused.returncode == 2 and "model.path: cannot read the config.json of 'some-org/unknown-model'" in refused.stderr


def test_fused_cross_entropy_keeps_one_chunk_of_logits(tmp_path):
    recipe = recipe_for(tmp_path, method={"type": "full"}, model={"path": "x", "dtype": "bfloat16"},
                        data={"train": {"path": "x"}, "max_length": 2048}, train={"micro_batch_size": 2})
    naive = estimate(recipe, SHAPE).loss * GIB
    recipe = recipe.model_copy(update={"kernels": ["fused_ce"]})
    fused = estimate(recipe, SHAPE).loss * GIB
    tokens = 2 * 2048
    chunk = 1024  # T x hidden / vocab = 2,621 tokens, capped at 1,024
    assert naive == pytest.approx(tokens * 100 * 12)
    assert fused == pytest.approx(chunk * 100 * (2 + 4 + 4) + tokens * 64 * 2)
    recipe = recipe.model_copy(update={"kernels": "auto"})
    assert estimate(recipe, SHAPE, strategy="zero3").loss * GIB == pytest.approx(naive)  # auto leaves it out there


def test_auto_never_picks_a_strategy_that_shards_the_head_a_listed_fused_ce_reads():
    recipe = load_recipe(ROOT / "recipes/llama3.1-8b-full-zero3.yaml", ["distributed.strategy=auto"]).resolved()
    shape = model_shape(recipe.model.path)
    assert autofit(recipe, 24, shape)[0].distributed.strategy == "zero3"
    recipe = recipe.model_copy(update={"kernels": ["fused_ce"]})
    chosen, _, _ = autofit(recipe, 24, shape)
    assert chosen.distributed.strategy not in ("zero3", "fsdp2")


def test_preference_objectives_count_two_sequences_per_row_and_the_reference_copy(tmp_path):
    """A dpo row is two sequences in one forward; full fine-tuning keeps a frozen reference copy."""
    data = {"train": {"path": "x", "format": "preference"}, "max_length": 32}
    common = {"model": {"path": "x", "dtype": "bfloat16"}, "data": data, "train": {"micro_batch_size": 2}}
    sft = recipe_for(tmp_path, method={"type": "full"}, **{**common, "data": {"train": {"path": "x"}, "max_length": 32}})
    dpo = recipe_for(tmp_path, method={"type": "full", "objective": "dpo"}, **common)
    orpo = recipe_for(tmp_path, method={"type": "full", "objective": "orpo"}, **common)
    assert estimate(dpo, SHAPE).activations == pytest.approx(estimate(sft, SHAPE, micro_batch_size=4).activations)
    assert estimate(dpo, SHAPE).weights == pytest.approx(2 * estimate(sft, SHAPE).weights)  # policy + reference
    assert estimate(orpo, SHAPE).weights == pytest.approx(estimate(sft, SHAPE).weights)  # no reference
    lora = recipe_for(tmp_path, method={"type": "lora", "objective": "dpo"}, **common)
    lora_sft = recipe_for(tmp_path, method={"type": "lora"}, **{**common, "data": {"train": {"path": "x"}, "max_length": 32}})
    assert estimate(lora, SHAPE).weights == pytest.approx(estimate(lora_sft, SHAPE).weights)  # the adapter disabled


@pytest.mark.parametrize("strategy, share", [("zero1", 1), ("zero2", 1), ("ddp", 1), ("zero3", 1 / 4), ("fsdp2", 1 / 4)])
def test_the_reference_copy_is_sharded_as_the_policy(tmp_path, strategy, share):
    """Full DPO's frozen reference: whole under DDP and ZeRO-1/2, a quarter on each of 4 processes under
    ZeRO-3 and FSDP2 (as the policy's weights); precomputed, nothing."""
    common = {"model": {"path": "x", "dtype": "bfloat16"}, "train": {"micro_batch_size": 2},
              "data": {"train": {"path": "x", "format": "preference"}, "max_length": 32},
              "distributed": {"strategy": strategy, "num_processes": 4}}
    live = recipe_for(tmp_path, method={"type": "full", "objective": "dpo"}, **common)
    stored = recipe_for(tmp_path, method={"type": "full", "objective": "dpo"}, preference={"reference": "precomputed"}, **common)
    reference_gib = SHAPE.params * 2 / 2**30
    assert estimate(live, SHAPE).weights - estimate(stored, SHAPE).weights == pytest.approx(reference_gib * share)
