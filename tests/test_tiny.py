from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.tiny import write_tiny_model


@pytest.mark.parametrize("arch,model_type", [("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "mistral")])
def test_tiny_model_is_a_real_loadable_checkpoint(tmp_path: Path, arch: str, model_type: str) -> None:
    out = write_tiny_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == model_type
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert 200_000 < model.num_parameters() < 2_000_000
    assert tokenizer.pad_token and tokenizer.eos_token and tokenizer.chat_template
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (tokenizer.bos_token is not None) == (arch == "llama")  # Llama-style BOS, Qwen-style none
    ids = tokenizer("Which word is a color?", return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0], skip_special_tokens=True) == "Which word is a color?"
    assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = AutoModelForCausalLM.from_pretrained(write_tiny_model(tmp_path / "a", "llama", seed=3))
    b = AutoModelForCausalLM.from_pretrained(write_tiny_model(tmp_path / "b", "llama", seed=3))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
