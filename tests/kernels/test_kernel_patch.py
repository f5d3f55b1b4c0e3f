"""kernels/patch.py: patched tiny models compute the same loss and gradients; training traces match."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ftl.kernels.patch import KERNELS, FusedLoss, KernelError, apply, supported
from ftl.kernels.rmsnorm import RMSNorm
from ftl.kernels.swiglu import SwiGLUMLP
from ftl.recipe.schema import RecipeError
from ftl.recipe.load import validate_recipe
from ftl.objectives.batch import Tokens
from ftl.objectives.sft import causal_lm_loss_sum
from ftl.tiny import write_tiny_model
from conftest import make_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-models")
    return {arch: write_tiny_model(root / arch, arch, hidden_size=48) for arch in ("llama", "qwen2", "mistral")}


def batch(vocab: int) -> Tokens:
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a masked prompt
    return Tokens(ids, labels, token_mask=mask, attention_mask=mask)


def loss_and_grads(model, data, fused=None):
    model.zero_grad()
    loss = causal_lm_loss_sum(model, data, fused)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_model_has_the_same_loss_and_gradients(models, arch, backend):
    model = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32)
    data = batch(model.config.vocab_size)
    names = set(model.state_dict())
    want_loss, want = loss_and_grads(model, data)
    assert apply(model, list(KERNELS), backend) == list(KERNELS)
    assert any(isinstance(m, RMSNorm) for m in model.modules()) and any(isinstance(m, SwiGLUMLP) for m in model.modules())
    assert set(model.state_dict()) == names  # checkpoints and exports are unchanged
    got_loss, got = loss_and_grads(model, data, FusedLoss(model, chunk=7, backend=backend))
    # Tolerance: fp32 with a different summation order (chunks, fused kernels): 1e-5 relative.
    assert torch.allclose(got_loss, want_loss, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name


def test_an_architecture_without_the_modules_is_an_error_and_auto_skips_it(caplog):
    assert supported(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, vocab_size=64)), "triton") == list(KERNELS)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(KernelError, match="rmsnorm: no known RMSNorm in GPT2LMHeadModel"):
        apply(model, ["rmsnorm"], "torch")
    with pytest.raises(KernelError, match="swiglu: no known gated MLP in GPT2LMHeadModel"):
        apply(model, ["swiglu"], "torch")
    with caplog.at_level(logging.INFO, logger="ftl.kernels.patch"):
        chosen = supported(model, "triton")
    assert "rmsnorm" not in chosen and "swiglu" not in chosen
    assert "rmsnorm not used for GPT2LMHeadModel" in caplog.text


def test_training_with_kernels_auto_has_the_trace_of_kernels_none(tmp_path, tiny_llama, demo_data, caplog):
    from ftl.checkpoints.rundir import read_metrics
    from ftl.train import train

    traces = {}
    for kernels in ("none", "auto"):
        recipe = make_recipe(tiny_llama, demo_data[0], tmp_path / kernels,
                             method={"type": "lora", "lora": {"r": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]}},
                             train={"max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-3, "seed": 0})
        recipe["kernels"] = kernels
        with caplog.at_level(logging.INFO, logger="ftl.training.trainer"):
            train(validate_recipe(recipe))
        traces[kernels] = [r["loss"] for r in read_metrics(tmp_path / kernels / "metrics.jsonl") if "loss" in r]
    assert "kernels: fused_ce (torch)" in caplog.text  # on CPU auto is the fused loss alone (kernels/patch.py AUTO)
    assert len(traces["auto"]) == 6
    for a, b in zip(traces["none"], traces["auto"]):
        assert abs(a - b) <= 1e-5 * abs(a)  # trainable lm_head: fused CE's weight gradient is used too


@pytest.mark.parametrize("strategy, kernels, message", [
    ("zero3", ["fused_ce"], "kernels: fused_ce reads lm_head's weight outside its forward, which zero3"),
    ("auto", ["fused_ce"], "kernels: fused_ce reads lm_head's weight outside its forward, which zero3"),  # auto: full FT -> zero3
    ("fsdp2", ["fused_ce"], "which fsdp2 keeps sharded"),
    ("zero3", ["flash"], "kernels"),
])
def test_recipe_refuses_kernels_that_cannot_work(tmp_path, strategy, kernels, message):
    recipe = make_recipe(tmp_path, tmp_path / "t.jsonl", tmp_path / "run", method={"type": "full"},
                         distributed={"strategy": strategy, "num_processes": 2})
    recipe["kernels"] = kernels
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe)
