"""QLoRA and 8-bit bases through real bitsandbytes layers (its CPU backend)."""

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import validate_recipe
from ftl.data.sources import build_dataset
from ftl.objectives.batch import pad_rows
from ftl.objectives.sft import causal_lm_loss_sum
from ftl.checkpoints.rundir import read_metrics
from ftl.models.build import build_model, load_for_inference
from ftl.training.optim import build_optimizer
from ftl.train import train
from conftest import make_recipe, write_yaml

QLORA = {"type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
FP32_COMPUTE = {"bits": 4, "compute_dtype": "float32"}


def _recipe(tiny_llama: Path, demo_data, run_dir: Path, with_eval: bool = False, **sections):
    sections.setdefault("method", QLORA)
    sections.setdefault("quantization", FP32_COMPUTE)
    return validate_recipe(make_recipe(tiny_llama, demo_data[0], run_dir, demo_data[1] if with_eval else None, **sections))


def test_qlora_loads_real_4bit_layers_and_trains_only_lora(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    model, _ = build_model(_recipe(tiny_llama, demo_data, tmp_path))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for name, layer in layers.items():
        weight = layer.weight
        assert weight.dtype == torch.uint8, name
        assert weight.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit values per byte
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    assert not isinstance(model.base_model.model.lm_head, bnb.nn.Linear4bit)  # skip_modules default
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # the parameter count of the 4-bit model is the full-precision model's, plus the adapters
    from transformers import AutoModelForCausalLM

    from ftl.models.build import parameter_count

    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(parameter_count(p) for p in model.parameters()) == AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters() + lora


def test_qlora_is_the_default_for_method_qlora(tmp_path: Path) -> None:
    recipe = validate_recipe(make_recipe(Path("m"), Path("d.jsonl"), tmp_path, method={"type": "qlora"}))
    assert recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
    assert recipe.quantization.double_quant and recipe.quantization.compute_dtype == "bfloat16"


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"method": {"type": "full"}, "quantization": {"bits": 4}}, "quantization.bits: full fine-tuning cannot train quantized weights"),
        ({"method": {"type": "qlora"}, "quantization": {"bits": 8}}, "quantization.bits: method.type: qlora means a 4-bit base"),
        ({"quantization": {"bits": 8, "quant_storage": "bfloat16"}}, "quantization.quant_storage: applies to 4-bit"),
        ({"quantization": {"bits": 3}}, "quantization.bits: Input should be 4 or 8"),
        ({"method": {"type": "lora", "lora": {"dtype": "base"}}, "quantization": {}, "train": {"mixed_precision": "fp16"}},
         "method.lora.dtype: fp16 loss scaling needs fp32 adapters"),
    ],
)
def test_impossible_combinations_fail_at_validation(tmp_path: Path, sections: dict, message: str) -> None:
    raw = make_recipe(Path("m"), Path("d.jsonl"), tmp_path, **sections)
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    assert message in str(err.value)
    assert len(err.value.problems) == 1


@pytest.mark.slow
def test_qlora_thirty_steps_lower_eval_loss(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    recipe = _recipe(
        tiny_llama, demo_data, tmp_path / "run", with_eval=True,
        train={"max_steps": 30, "micro_batch_size": 8, "learning_rate": 5e-3, "eval_steps": 15},
    )
    summary = train(recipe)
    assert summary.final_eval_loss < summary.initial_eval_loss - 0.5


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_types_and_double_quant_all_train(tiny_llama: Path, demo_data, tmp_path: Path, quant_type: str, double_quant: bool) -> None:
    quant = {**FP32_COMPUTE, "quant_type": quant_type, "double_quant": double_quant}
    recipe = _recipe(tiny_llama, demo_data, tmp_path, quantization=quant, train={"max_steps": 8, "micro_batch_size": 8, "learning_rate": 1e-2})
    train(recipe)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0]


def _eval_loss(model, tokenizer, dataset) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            batch = pad_rows([dataset[i] for i in range(start, min(start + 4, len(dataset)))], tokenizer.pad_token_id)
            total += causal_lm_loss_sum(model, batch).item()
            tokens += int(batch.trainable_tokens())
    return total / tokens


def test_saved_adapter_on_fresh_4bit_base_reproduces_training(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    recipe = _recipe(tiny_llama, demo_data, tmp_path / "run", with_eval=True, train={"max_steps": 5, "learning_rate": 1e-2})
    summary = train(recipe)
    model, tokenizer = load_for_inference(summary.checkpoint)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    eval_set = build_dataset(recipe.data.eval, tokenizer, recipe.data)
    assert _eval_loss(model, tokenizer, eval_set) == pytest.approx(summary.final_eval_loss, abs=1e-5)

    batch = pad_rows([eval_set[i] for i in range(4)], tokenizer.pad_token_id)
    again, _ = load_for_inference(summary.checkpoint)
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        b = again(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_eight_bit_adamw_state_is_uint8(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    recipe = _recipe(
        tiny_llama, demo_data, tmp_path, method={"type": "qlora", "lora": {"r": 64, "dropout": 0.0}},
        train={"optimizer": "adamw_8bit"},
    )
    model, tokenizer = build_model(recipe)
    optimizer = build_optimizer(model, recipe.train)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    batch = pad_rows([{"input_ids": list(range(5, 30)), "labels": list(range(5, 30))}] * 2, tokenizer.pad_token_id)
    causal_lm_loss_sum(model, batch).backward()
    optimizer.step()
    big = [p for p in model.parameters() if p.requires_grad and p.numel() >= 4096]
    assert big  # LoRA A is 64 x 64
    for p in big:
        state = optimizer.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert state["state1"].shape == p.shape


def test_eight_bit_base_with_lora(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    recipe = _recipe(tiny_llama, demo_data, tmp_path, method={"type": "lora"}, quantization={"bits": 8}, train={"max_steps": 2})
    model, _ = build_model(recipe)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    summary = train(recipe)
    assert torch.isfinite(torch.tensor(summary.final_train_loss))


@pytest.mark.parametrize("switch", ["use_dora", "use_rslora"])
@pytest.mark.parametrize("method_type", ["lora", "qlora"])
def test_dora_and_rslora(tiny_llama: Path, demo_data, tmp_path: Path, switch: str, method_type: str) -> None:
    method = {"type": method_type, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, switch: True}}
    quant = FP32_COMPUTE if method_type == "qlora" else {}
    recipe = _recipe(tiny_llama, demo_data, tmp_path, method=method, quantization=quant, train={"max_steps": 2})
    model, _ = build_model(recipe)
    config = model.peft_config["default"]
    assert getattr(config, switch) is True
    if switch == "use_dora":
        assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    else:
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(16 / 8**0.5)
    assert train(recipe).steps == 2


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_adapters_over_a_bf16_base_train_and_reload(tiny_llama: Path, demo_data, tmp_path: Path, method: str) -> None:
    """method.lora.dtype: base (and for QLoRA quantization.upcast_unquantized: false) trains all in
    bf16, as LitGPT's and torchtune's bf16-true runs do; the defaults keep peft's fp32 parts."""
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    quant = {"bits": 4, "compute_dtype": "bfloat16"} if method == "qlora" else {}
    common = dict(model={"dtype": "bfloat16"}, train={"max_steps": 3, "learning_rate": 1e-2, "mixed_precision": "no"})
    default, _ = build_model(_recipe(tiny_llama, demo_data, tmp_path / "default", method={"type": method, "lora": lora},
                                     quantization=quant, **common))
    recipe = _recipe(tiny_llama, demo_data, tmp_path / "run", with_eval=True, method={"type": method, "lora": {**lora, "dtype": "base"}},
                     quantization={**quant, "upcast_unquantized": False} if quant else {}, **common)
    model, _ = build_model(recipe)
    for built, adapters, norms in ((default, torch.float32, torch.float32 if quant else torch.bfloat16), (model, torch.bfloat16, torch.bfloat16)):
        dtypes = {n: p.dtype for n, p in built.named_parameters()}
        assert {d for n, d in dtypes.items() if "lora_" in n} == {adapters}
        assert {d for n, d in dtypes.items() if "norm" in n} == {norms}
    summary = train(recipe)
    reloaded, tokenizer = load_for_inference(summary.checkpoint)
    eval_set = build_dataset(recipe.data.eval, tokenizer, recipe.data)
    assert _eval_loss(reloaded, tokenizer, eval_set) == pytest.approx(summary.final_eval_loss, rel=1e-2)


@pytest.mark.slow
def test_paged_optimizer_falls_back_on_cpu_with_one_warning(tiny_llama: Path, demo_data, tmp_path: Path) -> None:
    raw = make_recipe(
        tiny_llama, demo_data[0], tmp_path / "run", method=QLORA, quantization=FP32_COMPUTE,
        train={"max_steps": 4, "optimizer": "paged_adamw_8bit"},
    )
    env = {**os.environ, "COLUMNS": "300"}
    result = subprocess.run(
        [sys.executable, "-m", "ftl", "train", str(write_yaml(tmp_path / "r.yaml", raw))],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Paged optimizers are not supported on CPU") == 1
