"""Export: merged shards that reload with from_pretrained and reproduce the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl import merge
from ftl.cli import main as cli_main
from ftl.config import ExportSection, validate_recipe
from ftl.errors import UserError
from ftl.export import export
from ftl.train import train
from conftest import make_recipe

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
VARIANTS = {
    "lora": {"method": {"type": "lora", "lora": LORA}},
    "lora-head": {"method": {"type": "lora", "lora": {**LORA, "modules_to_save": ["lm_head"]}}},
    "dora": {"method": {"type": "lora", "lora": {**LORA, "use_dora": True}}},
    "rslora": {"method": {"type": "lora", "lora": {**LORA, "use_rslora": True}}},
    "qlora": {"method": {"type": "qlora", "lora": LORA}, "quantization": {"compute_dtype": "float32"}},
    "qlora-dora": {"method": {"type": "qlora", "lora": {**LORA, "use_dora": True}}, "quantization": {"compute_dtype": "float32"}},
    "full": {"method": {"type": "full"}},
}
FP32 = ExportSection(dtype="float32")


@pytest.fixture(scope="module")
def runs(tiny_llama, demo_data, tmp_path_factory):
    """One short training run per variant (learning rate high enough to move every weight)."""
    root = tmp_path_factory.mktemp("export-runs")
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            sections = {k: dict(v) for k, v in VARIANTS[variant].items()}
            recipe = make_recipe(tiny_llama, demo_data[0], root / variant, demo_data[1],
                                 train={"max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-2, "seed": 0}, **sections)
            train(validate_recipe(recipe))
            cache[variant] = root / variant
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["lora", "lora-head", "dora", "rslora", "full"])
def test_float32_export_reproduces_the_trained_model(runs, variant, tmp_path):
    report = export(runs(variant), tmp_path / "out", FP32)
    assert report["passed"] and report["verified"] and report["greedy_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-5, report
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["passed"] is True


def test_export_is_a_standard_sharded_model_directory(runs, tiny_llama, tmp_path):
    out = tmp_path / "out"
    report = export(runs("lora-head"), out, ExportSection(dtype="bfloat16", max_shard_size="80KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    with safe_open(str(out / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    # lm_head was trained as a whole module (modules_to_save): the export carries the trained one.
    trained_head = safe_open(str(runs("lora-head") / "checkpoints/step-6/adapter_model.safetensors"), "pt")
    head_key = next(k for k in trained_head.keys() if "lm_head" in k)
    with safe_open(str(out / index["weight_map"]["lm_head.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), trained_head.get_tensor(head_key).to(torch.bfloat16))
    assert AutoTokenizer.from_pretrained(out).chat_template
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_llama}" in card and "method: lora" in card and "greedy agreement" in card
    assert report["passed"] and report["dtype"] == "bfloat16"
    # The shards read with safetensors alone hold exactly what from_pretrained loads.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    raw = {}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(raw) == set(index["weight_map"])
    for name, value in model.state_dict().items():
        assert torch.equal(raw[name], value), name


@pytest.mark.parametrize("variant", ["qlora", "qlora-dora"])
def test_qlora_merge_policies(runs, variant, tmp_path):
    """Merging into the dequantized NF4 base reproduces the trained model; the original base does not."""
    faithful = export(runs(variant), tmp_path / "dequantized", FP32)
    original = export(runs(variant), tmp_path / "original", ExportSection(dtype="float32", qlora_merge="original"))
    assert faithful["mode"] == "qlora-dequantized" and original["mode"] == "qlora-original"
    assert faithful["max_abs_logit_diff"] < 1e-5 and faithful["passed"]
    assert original["max_abs_logit_diff"] > 100 * faithful["max_abs_logit_diff"]
    assert original["passed"]  # allowed, with the difference reported in verify.json
    assert json.loads((tmp_path / "original" / "verify.json").read_text())["max_abs_logit_diff"] == original["max_abs_logit_diff"]


def test_merge_reads_one_shard_at_a_time(runs, tmp_path, monkeypatch):
    """Each output shard is written before the next one's tensors are read."""
    events: list[str] = []
    real_read, real_save = merge._read, merge.save_file
    monkeypatch.setattr(merge, "_read", lambda path, key: events.append("read") or real_read(path, key))
    monkeypatch.setattr(merge, "save_file", lambda tensors, path, metadata: events.append(f"save:{len(tensors)}") or real_save(tensors, path, metadata))
    export(runs("lora"), tmp_path / "out", ExportSection(dtype="float32", max_shard_size="150KB", verify=False))
    saves = [i for i, e in enumerate(events) if e.startswith("save")]
    assert len(saves) > 2
    start = 0
    for index in saves:  # between two saves: exactly the reads of the tensors the second save writes
        assert events[start:index] == ["read"] * int(events[index].split(":")[1])
        start = index + 1


def test_adapter_only(runs, tmp_path):
    report = export(runs("lora"), tmp_path / "adapter", adapter_only=True)
    assert report["adapter_only"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "adapter").iterdir()}


def test_failed_verification_exits_non_zero(runs, tmp_path, monkeypatch, capsys):
    """An export that does not reproduce the trained model (here: the adapter left out) fails."""
    monkeypatch.setattr(merge.Adapter, "merge", lambda self, name, weight: weight)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(runs("lora")), "--out", str(tmp_path / "out"), "--dtype", "float32"])
    assert exit_info.value.code == 2
    assert "verification failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["passed"] is False


def test_bad_sources_give_one_line_errors(runs, tmp_path):
    with pytest.raises(UserError, match="not a run directory or a checkpoint"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty"):
        export(runs("lora"), tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    checkpoint = runs("lora") / "checkpoints" / "step-6"
    with pytest.raises(UserError, match="--adapter-only needs a LoRA"):
        export(runs("full"), tmp_path / "x", adapter_only=True)
    assert checkpoint.is_dir()



def test_export_section_defaults(runs, tmp_path):
    """export.dir is where an export goes without --out; export.verify_prompts how many rows are compared."""
    options = ExportSection(dtype="float32", dir=str(tmp_path / "from-recipe"), verify_prompts=3)
    report = export(runs("lora"), None, options)
    assert report["out"] == str(tmp_path / "from-recipe") and report["sequences"] == 3


class _Planted:
    """Unpickling this runs a shell command (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _zero_checkpoint_with(payload: object, tiny_llama: Path, demo_data, tmp_path: Path) -> Path:
    """A run directory whose only checkpoint holds a deepspeed/ state file with ``payload``."""
    from ftl.checkpoint import write_manifest

    run_dir = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, demo_data[0], run_dir, method={"type": "full"})).resolved()
    checkpoint = run_dir / "checkpoints" / "step-1"
    (checkpoint / "deepspeed").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1}))
    torch.save(payload, checkpoint / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(checkpoint)  # an attacker can write a matching manifest too
    (run_dir / "checkpoints" / "latest").write_text("step-1")
    return checkpoint


def test_export_refuses_a_planted_pickle_in_deepspeed_state(tiny_llama, demo_data, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = _zero_checkpoint_with({"optimizer_state_dict": _Planted(marker)}, tiny_llama, demo_data, tmp_path)
    with pytest.raises(UserError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: not loaded: it holds pickled objects"):
        export(checkpoint, tmp_path / "out")
    assert not marker.exists()
    # The same check reads what DeepSpeed really writes (tensors, plain data, its loss scaler).
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from ftl.checkpoint import check_deepspeed_pickles

    legit = _zero_checkpoint_with({"w": torch.ones(3), "scaler": LossScaler(1.0), "n": [1, "a"]}, tiny_llama, demo_data, tmp_path / "b")
    check_deepspeed_pickles(legit)
