"""Model FLOPs per token (for MFU) against a hand count of the tiny Llama's matmuls."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ftl.training.flops import flops_counter, matmul_params, peak_flops

# hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, vocabulary 1000
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
# per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up 64x128 x2 + down 128x64
PER_LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
LINEAR = 2 * PER_LAYER + 64 * 1000  # + lm_head; embeddings are lookups, not matmuls


def test_full_fine_tuning_flops():
    model = LlamaForCausalLM(CONFIG)
    assert matmul_params(model) == (LINEAR, 0)
    # 6 per trainable matmul parameter + attention 12 x layers x (4 x 16) x sequence length
    assert flops_counter(model)(100.0) == 6 * LINEAR + 12 * 2 * 64 * 100


def test_lora_flops_count_the_frozen_base_at_four():
    model = get_peft_model(LlamaForCausalLM(CONFIG), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lora = 2 * (8 * (64 + 64) + 8 * (64 + 32))  # A (r x in) + B (out x r) on q and v, per layer
    assert matmul_params(model) == (lora, LINEAR)
    assert flops_counter(model)(10.0) == 6 * lora + 4 * LINEAR + 12 * 2 * 64 * 10


def test_peak_flops():
    assert peak_flops(400.0) == 400e12  # the recipe's train.peak_tflops wins
    if not torch.cuda.is_available():
        assert peak_flops() is None  # CPU: unknown, so no MFU is reported


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_known_gpus(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: name)
    assert peak_flops() == expected


def test_training_records_model_flops_and_peak_memory(tiny_llama, demo_data, tmp_path):
    from ftl.recipe.load import validate_recipe
    from ftl.checkpoints.rundir import read_metrics
    from ftl.train import train
    from conftest import make_recipe

    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "run", train={"peak_tflops": 1.0})))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    for r in records:
        assert r["tflops_per_device"] > 0 and r["peak_memory_gib"] > 0.1 and r["eta_s"] >= 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)
    assert records[-1]["eta_s"] == 0
