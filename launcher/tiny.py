"""Tiny random models with a locally trained tokenizer, for tests and the demo.

Nothing can be downloaded here, so every test and the demo build their own model: a real
transformers architecture (Llama, Qwen2 or Mistral) with random weights and a byte-level BPE
tokenizer trained in a second with ``tokenizers``, saved like any hub checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from ftl.data.demo import corpus as demo_corpus

log = logging.getLogger(__name__)

ARCHS = ("llama", "qwen2", "mistral")

BOS, EOS, PAD = "<|begin_of_text|>", "<|im_end|>", "<|pad|>"
IM_START = "<|im_start|>"
# Qwen2's tokenizer class defaults its unknown token to this; it must exist in the vocabulary.
END_OF_TEXT = "<|endoftext|>"

# ChatML, as Qwen uses it. Llama-style tokenizers get a BOS in front, as Llama 3's template does.
CHAT_TEMPLATE = (
    "{% if bos_token and add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with BOS/EOS/PAD and a ChatML chat template."""
    specials = [PAD, BOS, EOS, IM_START, END_OF_TEXT]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    template = CHAT_TEMPLATE.replace("add_bos", "true" if add_bos else "false")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS if add_bos else None,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, END_OF_TEXT],
        chat_template=template,
    )


def build_config(arch: str, vocab_size: int, hidden_size: int = 128, layers: int = 2, pad_token_id: int = 0):
    """A small config of the given family: 4 attention heads, 2 KV heads (grouped-query attention)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")


def write_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 128,
    layers: int = 2,
    vocab_size: int = 2048,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a random ``arch`` model and its tokenizer to ``out_dir``; returns the directory."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(corpus if corpus is not None else demo_corpus(), vocab_size, add_bos=arch == "llama")
    config = build_config(arch, len(tokenizer), hidden_size, layers, pad_token_id=tokenizer.pad_token_id)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("wrote %s model with %d parameters to %s", arch, model.num_parameters(), out)
    return out
