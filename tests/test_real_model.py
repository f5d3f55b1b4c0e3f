"""The real SmolLM2-135M-Instruct (scripts/fetch_artifacts.py): fine-tuned for a few steps on chat
data and exported; the LoRA export generates exactly what the trained model does, and LoRA and QLoRA
with every default export and verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftl.recipe.schema import DataSource
from ftl.recipe.load import validate_recipe
from ftl.data.demo import write_extraction_data
from ftl.evaluate import prompts_and_answers
from ftl.export.write import export
from ftl.models.build import load_for_inference
from ftl.train import train
from ftl.checkpoints.rundir import read_metrics
from conftest import cli_exit_code, make_recipe

GENERATION_SCORERS = ["exact_match", "json_valid", "json_fields"]


def _greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    model, tokenizer = load_for_inference(path)
    out = []
    with torch.no_grad():
        for ids in prompts:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out.append(tokens[0, len(ids):].tolist())
    return out


@pytest.mark.slow
def test_real_model_trains_and_its_export_generates_the_same(artifacts, tmp_path, capsys):
    """LoRA on the real model; its export (float32 and GGUF) generates what the trained model does.
    (QLoRA's real export is the defaults test below; its merge against the trained model, test_export.py.)"""
    model = artifacts / "models" / "smollm2-135m-instruct"
    train_path, eval_path = write_extraction_data(tmp_path / "data", n_train=48, n_eval=6)
    recipe = validate_recipe(make_recipe(
        model, train_path, tmp_path / "run", eval_path, method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        data={"train": {"path": str(train_path), "format": "chat"}, "eval": {"path": str(eval_path), "format": "chat"}, "max_length": 96},
        train={"max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "seed": 0},
        eval={"generate": {"rows": 6, "max_new_tokens": 24, "scorers": GENERATION_SCORERS}},
        export={"dtype": "float32", "gguf": "f32"}))
    summary = train(recipe)
    assert summary.final_eval_loss < summary.initial_eval_loss
    # The generation metrics logged on the demo's task equal what `ftl eval` computes on the checkpoint.
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_exact_match" in r]
    assert [r["step"] for r in logged] == [0, 3] and logged[-1]["eval_json_valid"] > logged[0]["eval_json_valid"]
    capsys.readouterr()
    assert cli_exit_code(["eval", summary.checkpoint, "--data", str(eval_path), "--limit", "6", "--max-new-tokens", "24",
                          "--scorers", ",".join(GENERATION_SCORERS)]) == 0
    out = capsys.readouterr().out
    for metric in ("exact_match", "json_valid", "json_fields"):
        assert f"{metric}: {logged[-1]['eval_' + metric]:.4g} (mean of 6 rows)" in out, out
    report = export(tmp_path / "run", tmp_path / "export")
    assert report["passed"]
    _, tokenizer = load_for_inference(summary.checkpoint)
    prompts = [ids for ids, _ in prompts_and_answers(DataSource(path=str(eval_path), format="chat"), tokenizer)]
    trained = _greedy(Path(summary.checkpoint), prompts)
    assert _greedy(tmp_path / "export", prompts) == trained
    assert any(tokenizer.decode(t).startswith('{"name"') for t in trained)  # it learnt the format already
    # llama.cpp's conversion of the export, read back by transformers' GGUF loader: the same model
    assert report["gguf"] == "model-f32.gguf" and (tmp_path / "export" / "model-f32.gguf").is_file()
    assert report["gguf_greedy_agreement"] == 1.0 and report["gguf_max_abs_logit_diff"] < 1e-3, report
    # the adapter alone, converted by llama.cpp's LoRA converter: every LoRA matrix is in the file
    from gguf import GGUFReader
    from safetensors import safe_open

    adapter = export(tmp_path / "run", tmp_path / "adapter", adapter_only=True, updates={"gguf": "f16"})
    tensors = GGUFReader(tmp_path / "adapter" / adapter["gguf"]).tensors
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert len(tensors) == len(list(f.keys())) > 0
    # The default export (bf16) of the real model: the merge is verified in float32, the bf16 rounding
    # (larger than any tolerance that would catch a merge bug on this model) is reported beside it.
    bf16 = export(tmp_path / "run", tmp_path / "export-bf16", updates={"dtype": "bfloat16"})
    assert bf16["passed"] and bf16["weights_equal_rounded_merge"]
    assert bf16["merge_max_abs_logit_diff"] <= 1e-4 * bf16["reference_logit_std"] < bf16["rounding_max_abs_logit_diff"]
    # transformers 4.x stacks read the same RoPE base as transformers 5 (100000, not their default 10000)
    from test_export import read_with_transformers4

    assert read_with_transformers4(artifacts, tmp_path / "export-bf16")["rope_theta"] == 100000.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_real_model_with_every_default_exports_and_verifies(artifacts, tmp_path, method):
    """What a user who keeps the defaults gets (bf16 base, bf16 4-bit compute, bf16 export, f16 GGUF):
    `ftl export --gguf` exits 0 with a verified merge, on the real SmolLM2."""
    model = artifacts / "models" / "smollm2-135m-instruct"
    train_path, eval_path = write_extraction_data(tmp_path / "data", n_train=16, n_eval=4)
    recipe = make_recipe(model, train_path, tmp_path / "run", eval_path, method={"type": method},
                         data={"train": {"path": str(train_path), "format": "chat"},
                               "eval": {"path": str(eval_path), "format": "chat"}, "max_length": 96},
                         train={"max_steps": 2, "micro_batch_size": 4, "logging_steps": 1, "seed": 0})
    del recipe["model"]["dtype"]
    if method == "qlora":
        recipe["quantization"] = {"bits": 4}
    resolved = validate_recipe(recipe)
    assert resolved.model.dtype == "bfloat16" and resolved.quantization.compute_dtype == "bfloat16"
    train(resolved)
    assert cli_exit_code(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--gguf"]) == 0
    report = json.loads((tmp_path / "export" / "verify.json").read_text())
    assert report["passed"] and report["dtype"] == "bfloat16" and report["weights_equal_rounded_merge"], report
    assert report["merge_max_abs_logit_diff"] <= 1e-4 * report["reference_logit_std"], report
    assert report["gguf"] == "model-f16.gguf" and report["gguf_greedy_agreement"] > 0.9, report
