"""Model-family facts (ftl.models.families) against the models transformers builds: the decoder and its
blocks are found in every supported family, wrapped or not, and the class tables name real classes."""

from __future__ import annotations

import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Gemma2Config, Qwen3Config

from ftl.models import families
from ftl.tiny import ARCHS, build_config


def _module_of(class_name: str) -> object:
    """transformers' modeling module of a class named after its family (Qwen2MLP: models.qwen2)."""
    family = next(f for f in ("gemma2", "gemma", "qwen3", "qwen2", "mistral", "llama") if class_name.lower().startswith(f))
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


@pytest.mark.parametrize("name", [*families.RMSNORMS, *families.MLPS])
def test_the_kernel_tables_name_transformers_classes(name):
    assert isinstance(getattr(_module_of(name), name), type)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", ["causal_lm", "score", "lora"])
def test_decoder_and_its_layers_are_found_in_every_family(arch, head):
    config = build_config(arch, vocab_size=64, hidden_size=32, layers=3)
    if head == "score":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    if head == "lora":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    stack = families.decoder(model)
    layers = families.decoder_layers(model, "test", "")
    assert isinstance(stack.layers, torch.nn.ModuleList) and list(stack.layers) == layers and len(layers) == 3
    assert stack is not families.base_model(model)


def test_a_model_without_decoder_layers_is_an_error_naming_who_needed_them():
    with pytest.raises(families.ArchitectureError, match="train.compile: found no decoder layers in Linear"):
        families.decoder_layers(torch.nn.Linear(2, 2), "train.compile:", "set train.compile: false")
    assert families.decoder(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("config", [Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                intermediate_size=64, num_hidden_layers=1, vocab_size=32),
                                    Gemma2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                                                 intermediate_size=64, num_hidden_layers=1, vocab_size=32),
                                    build_config("llama", vocab_size=32, hidden_size=64, layers=1)], ids=lambda c: c.model_type)
def test_head_width_and_kv_heads_read_as_the_model_builds_them(config):
    """Qwen3 and Gemma 2 heads are not hidden / heads wide: the model's projections say how wide."""
    attention = AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    assert attention.q_proj.out_features == config.num_attention_heads * families.head_dim(config)
    assert attention.k_proj.out_features == families.kv_heads(config) * families.head_dim(config)
