"""Building the model from the recipe: bad model files and settings are one clear error, and a
4-bit base computes one way on every CPU."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from ftl.recipe.load import validate_recipe
from ftl.models.build import build_model
from ftl.models.tokenizer import ModelError
from ftl.tiny import write_tiny_model
from ftl.train import TrainError, train
from conftest import make_recipe


def _recipe(model_path: Path, data, tmp_path: Path, **sections):
    return validate_recipe(make_recipe(model_path, data[0], tmp_path / "run", **sections)).resolved()


def _copy(model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_weights_file_is_a_model_error(tiny_llama, demo_data, tmp_path, damage):
    model = _copy(tiny_llama, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    with pytest.raises(ModelError, match="model.path: cannot load a causal LM from"):
        build_model(_recipe(model, demo_data, tmp_path))


def test_a_missing_local_path_fails_at_once_without_the_network(demo_data, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"model.path: /nonexistent/llama does not exist \(a local path"):
        build_model(_recipe(Path("/nonexistent/llama"), demo_data, tmp_path))
    assert time.perf_counter() - start < 5


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_llama, demo_data, tmp_path):
    small = write_tiny_model(tmp_path / "small", "llama", hidden_size=64, vocab_size=300)
    recipe = _recipe(small, demo_data, tmp_path, model={"tokenizer": str(tiny_llama), "dtype": "float32"})
    with pytest.raises(ModelError, match=r"model.tokenizer: the tokenizer has \d+ tokens but the model's embedding has \d+ rows"):
        build_model(recipe)


def test_modules_to_save_must_name_a_module(tiny_llama, demo_data, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["lm_haed"]}
    with pytest.raises(ModelError, match="method.lora.modules_to_save: the model has no module named 'lm_haed'"):
        build_model(_recipe(tiny_llama, demo_data, tmp_path, method={"type": "lora", "lora": lora}))


def test_freezing_everything_is_refused(tiny_llama, demo_data, tmp_path):
    with pytest.raises(ModelError, match="method.freeze: the patterns freeze every parameter"):
        build_model(_recipe(tiny_llama, demo_data, tmp_path, method={"type": "full", "freeze": ["*"]}))


def test_a_non_finite_loss_stops_with_a_checkpoint_from_before_it(tiny_llama, demo_data, tmp_path):
    from safetensors.torch import load_file

    from ftl.checkpoints.checkpoint import verify

    recipe = _recipe(tiny_llama, demo_data, tmp_path, train={"max_steps": 6, "micro_batch_size": 2, "learning_rate": 1e30,
                                                              "max_grad_norm": None, "seed": 0})
    with pytest.raises(TrainError, match=r"step \d: the loss \(.*\) or gradient norm \(.*\) is not finite") as err:
        train(recipe)
    checkpoint = Path(str(err.value).split(";")[1].split()[0])
    verify(checkpoint)
    weights = load_file(checkpoint / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_4bit_base_keeps_one_compute_path_in_eval(tiny_llama, demo_data, tmp_path):
    """bitsandbytes repacks 4-bit weights for a bf16 CPU kernel in eval mode on AVX-512-BF16 CPUs;
    ftl's models keep the training path, so eval and train forwards agree on every CPU."""
    import bitsandbytes as bnb

    recipe = _recipe(tiny_llama, demo_data, tmp_path, method={"type": "qlora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                     quantization={"compute_dtype": "float32"})
    model, _ = build_model(recipe)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.arange(3, 40).view(1, -1)
    model.train()
    with torch.no_grad():
        training_path = model(input_ids=ids).logits
    model.eval()
    with torch.no_grad():
        eval_path = model(input_ids=ids).logits
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert torch.allclose(training_path, eval_path, atol=1e-6)
