"""The planner's activation and loss terms against what a real step holds, tensor by tensor
(``ftl.planning.probe``: torch's MemTracker on CPU), for tiny Llama, Qwen2 and Mistral models
trained full, with LoRA and with QLoRA (a real bitsandbytes 4-bit layer), with and without
activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftl.distributed import strategies
from ftl.recipe.schema import Recipe
from ftl.planning.memory import GIB, activation_terms, estimate, model_shape, precision
from ftl.planning.probe import measure_step
from ftl.tiny import write_tiny_model
from conftest import make_recipe

MICRO, SEQ = 2, 256


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    return {arch: write_tiny_model(root / arch, arch, hidden_size=256, layers=2) for arch in ("llama", "qwen2", "mistral")}


def _recipe(model: Path, method: str, checkpointing: bool, tmp_path: Path, dora: bool = False, kernels: str | list = "none",
            bf16: bool = False) -> Recipe:
    """``bf16``: bf16 adapters and (QLoRA) bf16 norms and embeddings, with no autocast (bf16-true)."""
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "use_dora": dora, "dtype": "base" if bf16 else "float32"}
    sections = {"method": {"type": method, "lora": lora},
                "train": {"micro_batch_size": MICRO, "gradient_checkpointing": checkpointing, "mixed_precision": "no" if bf16 else "bf16"},
                "data": {"max_length": SEQ},
                # full fine-tuning keeps fp32 weights under bf16 autocast; (Q)LoRA a bf16 base
                "model": {"dtype": "float32" if method == "full" else "bfloat16"}}
    if method == "qlora":
        sections["quantization"] = {"bits": 4, "compute_dtype": "bfloat16", "upcast_unquantized": not bf16}
    return Recipe.model_validate({**make_recipe(model, tmp_path / "x.jsonl", tmp_path / "run", **sections), "kernels": kernels})


def _check(recipe: Recipe, model: Path) -> None:
    shape = model_shape(str(model))
    measured = measure_step(recipe)
    fused = recipe.kernels != "none"
    terms = activation_terms(recipe, shape, MICRO * SEQ, SEQ, precision(recipe, strategies.build("single", recipe)), fused)
    assert terms.blocks + terms.copies == pytest.approx(measured.blocks, rel=0.10)
    if not (recipe.train.gradient_checkpointing or recipe.method.lora.use_dora or fused):
        # The loss phase is the peak: what it adds to the forward's end is the loss term. 12 bytes
        # per logit (fp32 logits, log-softmax and gradient, the GPU figure) is the ceiling; CPU
        # steps peak at ~10.8 as the logits are freed a little earlier.
        assert 1.0 <= terms.loss / (measured.peak - measured.before_forward - measured.blocks) <= 1.25
    planned = estimate(recipe, shape).allocated * GIB
    assert 0.95 <= planned / measured.peak <= 1.25  # the whole step's peak: never optimistic


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_the_planner_terms_equal_what_a_step_holds(models, arch, method, checkpointing, tmp_path):
    _check(_recipe(models[arch], method, checkpointing, tmp_path), models[arch])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dora_keeps_the_base_and_lora_outputs(models, method, checkpointing, tmp_path):
    _check(_recipe(models["llama"], method, checkpointing, tmp_path, dora=True), models["llama"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_fused_cross_entropy_holds_one_chunk(models, method, tmp_path):
    _check(_recipe(models["llama"], method, False, tmp_path, kernels=["fused_ce"]), models["llama"])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_true_adapters_share_their_inputs(models, method, checkpointing, tmp_path):
    _check(_recipe(models["llama"], method, checkpointing, tmp_path, bf16=True), models["llama"])
