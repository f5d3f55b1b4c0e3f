"""``ftl plan`` against published peak memory of real fine-tuning runs.

The figures are torch's peak-allocated counters, from the projects' own docs (the table and its
sources: ``../shared/planner-reference.md``; the models' public config.json files are in
``tests/planner_models``). Each case is the ftl recipe of the same run: model, method, batch,
sequence length, gradient accumulation, checkpointing, loss and optimizer, in bf16.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftl.recipe.load import validate_recipe
from ftl.planning.memory import estimate, model_shape

MODELS = Path(__file__).resolve().parents[1] / "planner_models"
# torchtune's README table (Llama 3.2 3B, batch 2 x 4096 packed, A100, 'Peak Memory Active').
TT = {"data": {"max_length": 4096, "packing": True}, "train": {"micro_batch_size": 2}}
TT_AC = {**TT, "train": {"micro_batch_size": 2, "gradient_checkpointing": True}, "kernels": ["fused_ce"]}
TT_LORA = {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "dtype": "base"}  # torchtune's adapters are bf16, as LitGPT's
# LitGPT's config_hub benchmark (A10G, bf16-true, 512 tokens); global batch 8 unless said.
QV = {"r": 32, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "dtype": "base"}


def lit(micro: int, global_batch: int = 8) -> dict:
    return {"data": {"max_length": 512}, "train": {"micro_batch_size": micro, "gradient_accumulation_steps": global_batch // micro}}


CASES = {  # id: (published GiB, model, recipe sections)
    "tt-3b-full-packed": (60.0, "llama-3.2-3b", {**TT, "method": {"type": "full"}}),
    "tt-3b-full-compile": (51.0, "llama-3.2-3b", {**TT, "method": {"type": "full"}}),
    "tt-3b-full-chunkedce": (42.9, "llama-3.2-3b", {**TT, "method": {"type": "full"}, "kernels": ["fused_ce"]}),
    "tt-3b-full-ac": (24.9, "llama-3.2-3b", {**TT_AC, "method": {"type": "full"}}),
    "tt-3b-full-8bitadam": (17.6, "llama-3.2-3b", {**TT_AC, "method": {"type": "full"},
                                                   "train": {**TT_AC["train"], "optimizer": "adamw_8bit"}}),
    "tt-3b-lora": (8.5, "llama-3.2-3b", {**TT_AC, "method": {"type": "lora", "lora": TT_LORA}}),
    "tt-3b-qlora": (4.6, "llama-3.2-3b", {**TT_AC, "method": {"type": "qlora", "lora": TT_LORA}, "train": TT_AC["train"] | {"mixed_precision": "no"},
                                         "quantization": {"double_quant": True, "upcast_unquantized": False}}),
    "lit-llama3-8b-lora": (18.38, "llama-3.1-8b", {**lit(1), "method": {"type": "lora", "lora": QV}}),
    "lit-llama2-7b-lora": (18.41, "llama-2-7b", {**lit(2), "method": {"type": "lora", "lora": QV}}),
    "lit-mistral-7b-lora": (19.24, "mistral-7b-v0.1", {**lit(2), "method": {"type": "lora", "lora": QV}}),
    "lit-llama3-8b-qlora": (16.21, "llama-3.1-8b", {**lit(2), "method": {"type": "qlora", "lora": QV}}),
    "lit-llama2-7b-qlora": (12.74, "llama-2-7b", {**lit(2), "method": {"type": "qlora", "lora": QV}}),
    "lit-mistral-7b-qlora": (13.31, "mistral-7b-v0.1", {**lit(2), "method": {"type": "qlora", "lora": QV}}),
    "lit-tinyllama-full": (13.13, "tinyllama-1.1b", {**lit(4, 32), "method": {"type": "full"}}),
    "lit-tinyllama-lora": (12.57, "tinyllama-1.1b", {**lit(8), "method": {"type": "lora", "lora": {**QV, "target_modules": "all-linear"}}}),
}
# Runs whose framework saves memory in a way ftl has no setting for: ftl's own run of the same
# recipe needs more, so the estimate is above the figure by more than 15% (never below it).
NOT_EXPRESSIBLE = {
    "tt-3b-qlora": "activation offloading: torchtune moves the checkpointed layer inputs (1.3 GiB here) to CPU memory",
}


def _recipe(sections: dict, model: str, tmp_path: Path):
    qlora = sections["method"]["type"] == "qlora"
    raw = {"model": {"path": str(MODELS / model), "dtype": "bfloat16"}, "output": {"dir": str(tmp_path / "run")},
           "distributed": {"strategy": "single", "num_processes": 1}, "kernels": "none",
           **{k: v for k, v in sections.items() if k not in ("data", "train")}}
    raw["data"] = {"train": {"path": "x.jsonl"}, **sections["data"]}
    # bf16-true. QLoRA as ftl runs it by default: peft's preparation upcasts what is not quantized
    # to fp32, under bf16 autocast. (LitGPT keeps those parts in bf16, yet its published peaks match
    # this run: with upcast_unquantized false the estimates are 0.72-0.75 x LitGPT's figures, so
    # its 2024 stack held more than ftl's bf16 run would; torchtune's torchao NF4 does not.)
    raw["train"] = {"mixed_precision": "bf16" if qlora else "no", **sections["train"]}
    if qlora:
        raw["quantization"] = {"compute_dtype": "bfloat16", "double_quant": False, **sections.get("quantization", {})}
    return validate_recipe(raw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_estimate_matches_the_published_peak(case, tmp_path):
    published, model, sections = CASES[case]
    recipe = _recipe(sections, model, tmp_path)
    ratio = estimate(recipe, model_shape(recipe.model.path)).allocated / published
    assert ratio >= 0.9, f"{case}: the estimate is {ratio:.2f} x the published peak (optimistic)"
    if case not in NOT_EXPRESSIBLE:
        assert ratio <= 1.15, f"{case}: the estimate is {ratio:.2f} x the published peak"
