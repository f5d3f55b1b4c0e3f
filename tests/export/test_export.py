"""Export: merged shards that reload with from_pretrained and reproduce the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.export import merge
from ftl.cli import main as cli_main
from ftl.recipe.schema import ExportSection
from ftl.recipe.load import validate_recipe
from ftl.errors import UserError
from ftl.export.write import export
from ftl.train import train
from conftest import cli_exit_code, make_recipe

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
VARIANTS = {
    "lora": {"method": {"type": "lora", "lora": LORA}},
    "lora-head": {"method": {"type": "lora", "lora": {**LORA, "modules_to_save": ["lm_head"]}}},
    "dora": {"method": {"type": "lora", "lora": {**LORA, "use_dora": True}}},
    "rslora": {"method": {"type": "lora", "lora": {**LORA, "use_rslora": True}}},
    "qlora": {"method": {"type": "qlora", "lora": LORA}, "quantization": {"compute_dtype": "float32"}},
    "qlora-dora": {"method": {"type": "qlora", "lora": {**LORA, "use_dora": True}}, "quantization": {"compute_dtype": "float32"}},
    "full": {"method": {"type": "full"}},
    # every default a user keeps: bf16 base weights, bf16 4-bit compute
    "lora-defaults": {"model": {"dtype": "bfloat16"}, "method": {"type": "lora", "lora": LORA}},
    "qlora-defaults": {"model": {"dtype": "bfloat16"}, "method": {"type": "qlora", "lora": LORA}},
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
    assert report["passed"] and report["verified"] and report["merge_greedy_agreement"] == 1.0
    assert report["merge_max_abs_logit_diff"] < 1e-5, report
    # float32 files are the float32 merge itself: nothing is rounded
    assert report["weights_equal_rounded_merge"] and report["rounding_max_abs_logit_diff"] == 0.0
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["passed"] is True


@pytest.mark.parametrize("variant", ["lora-defaults", "qlora-defaults"])
def test_default_export_of_a_default_run_passes_and_still_catches_a_merge_bug(runs, variant, tmp_path, monkeypatch, capsys):
    """The recipe's defaults (bf16 base, bf16 4-bit compute, bf16 export) pass their own verification:
    the trained model is compared in float32 with the float32 merge into the base as training loaded
    it (its bf16 rounding), so bf16 noise is not mistaken for a merge error, and a merge error is
    still caught (here: a LoRA scale 10% off)."""
    assert cli_exit_code(["export", str(runs(variant)), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "verify.json").read_text())
    assert report["passed"] and report["dtype"] == "bfloat16" and report["weights_equal_rounded_merge"], report
    assert report["merge_max_abs_logit_diff"] < 1e-5 * report["reference_logit_std"] * 10, report

    real_merge = merge.Adapter.merge

    def wrong_scale(self, name, weight):
        return weight + 1.1 * (real_merge(self, name, weight) - weight)

    monkeypatch.setattr(merge.Adapter, "merge", wrong_scale)
    capsys.readouterr()
    assert cli_exit_code(["export", str(runs(variant)), "--out", str(tmp_path / "bad")]) == 2
    assert "verification failed" in capsys.readouterr().err
    failed = json.loads((tmp_path / "bad.failed" / "verify.json").read_text())
    assert failed["merge_max_abs_logit_diff"] > failed["merge_tolerance"], failed


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
    assert f"base_model: {tiny_llama.name}\n" in card and "method: lora" in card and "greedy agreement" in card
    assert report["passed"] and report["dtype"] == "bfloat16" and report["weights_equal_rounded_merge"]
    # The merge is judged in float32; bf16 rounding is reported beside it, and is far larger.
    assert report["merge_max_abs_logit_diff"] < 1e-5 < report["rounding_max_abs_logit_diff"]
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
    assert faithful["merge_max_abs_logit_diff"] < 1e-5 and faithful["passed"]
    assert original["merge_max_abs_logit_diff"] > 100 * faithful["merge_max_abs_logit_diff"]
    assert original["passed"]  # allowed, with the difference reported in verify.json
    saved = json.loads((tmp_path / "original" / "verify.json").read_text())
    assert saved["merge_max_abs_logit_diff"] == original["merge_max_abs_logit_diff"]


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


def test_adapter_only_is_what_serving_engines_load(runs, tiny_llama, tmp_path):
    """vLLM's LoRARequest and llama.cpp's LoRA converter read adapter_config.json and the weights;
    tokenizer files draw vLLM warnings, local paths mean nothing elsewhere."""
    from peft import PeftModel

    out = tmp_path / "adapter"
    report = export(runs("lora"), out, adapter_only=True)
    assert report["adapter_only"]
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_llama.name
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and str(tmp_path.parent) not in card
    # the card's own snippet, run as written (paths filled in), loads the adapter onto the base
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace(f"path/to/{tiny_llama.name}", str(tiny_llama)).replace("path/to/this/directory", str(out))
    namespace: dict = {}
    exec(snippet, namespace)
    assert not any("lora" in k for k in namespace["model"].state_dict())  # merged by the snippet's last line
    # peft loads it onto the base and reproduces the checkpoint's adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    trained = safe_open(str(runs("lora") / "checkpoints/step-6/adapter_model.safetensors"), "pt")
    key = next(k for k in trained.keys() if "lora_B" in k)
    assert torch.equal(dict(loaded.named_parameters())[key.replace(".weight", ".default.weight")], trained.get_tensor(key))
    with pytest.raises(UserError, match=r"trains whole modules \(lm_head.*export the merged model"):
        export(runs("lora-head"), tmp_path / "head-adapter", adapter_only=True)
    assert not (tmp_path / "head-adapter").exists()


def test_failed_verification_exits_non_zero_and_leaves_nothing_at_out(runs, tmp_path, monkeypatch, capsys):
    """An export that does not reproduce the trained model (here: the adapter left out) fails, and a
    serving job pointed at --out finds nothing there."""
    monkeypatch.setattr(merge.Adapter, "merge", lambda self, name, weight: weight)
    (tmp_path / "out.failed").mkdir()  # somebody's, whoever made it: kept as it is
    (tmp_path / "out.failed" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(runs("lora")), "--out", str(tmp_path / "out"), "--dtype", "float32"])
    assert exit_info.value.code == 2
    assert "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "out.failed").iterdir()] == ["notes.txt"]
    report = json.loads((tmp_path / "out.failed-2" / "verify.json").read_text())
    assert report["passed"] is False and report["merge_max_abs_logit_diff"] > report["merge_tolerance"]
    # the merge is caught even though the files are exactly what the (broken) merge computed
    assert report["weights_equal_rounded_merge"]


def test_files_are_readable_by_other_users_and_hold_no_local_paths(runs, tmp_path):
    """safetensors writes 0600; a serving container running as another user must read the export."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        export(runs("lora"), tmp_path / "out", ExportSection(dtype="float32", max_shard_size="150KB"))
    finally:
        os.umask(old)
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for name in ("README.md", "config.json", "verify.json"):
        assert str(tmp_path.parent) not in (tmp_path / "out" / name).read_text(), name


def test_bad_sources_give_one_line_errors(runs, tmp_path):
    with pytest.raises(UserError, match="not a run directory, a checkpoint"):
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
    from ftl.checkpoints.checkpoint import write_manifest

    run_dir = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, demo_data[0], run_dir, method={"type": "full"})).resolved()
    checkpoint = run_dir / "checkpoints" / "step-1"
    (checkpoint / "deepspeed").mkdir(parents=True)
    (run_dir / "run.yaml").write_text(recipe.to_yaml())
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
    from ftl.distributed.strategies.zero import check_deepspeed_pickles

    legit = _zero_checkpoint_with({"w": torch.ones(3), "scaler": LossScaler(1.0), "n": [1, "a"]}, tiny_llama, demo_data, tmp_path / "b")
    check_deepspeed_pickles(legit)


@pytest.mark.parametrize("fmt", ["alpaca", "completion"])
def test_export_ships_the_chat_template_the_model_was_trained_with(runs, demo_data, tiny_llama, fmt, tmp_path):
    """A serving engine's chat API renders requests with the export's template: for alpaca data it must
    produce the training prompt, token for token (ftl.data.sources's tokenization is the oracle)."""
    from ftl.data.sources import tokenize_row

    run = runs("lora")
    if fmt == "completion":  # the same run, its recipe saying it trained on plain text
        run = tmp_path / "completion-run"
        import shutil

        shutil.copytree(runs("lora"), run, ignore=shutil.ignore_patterns("export*"))
        (run / "run.yaml").write_text((run / "run.yaml").read_text().replace("format: alpaca", "format: completion"))
    export(run, tmp_path / "out", ExportSection(dtype="float32", verify=False))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template != AutoTokenizer.from_pretrained(tiny_llama).chat_template
    recipe = validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "r"))
    source = recipe.data.train[0].model_copy(update={"format": fmt})
    row = json.loads(demo_data[0].read_text().splitlines()[0])
    if fmt == "alpaca":
        row = {**row, "input": None}
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
    else:
        row = {"text": "Once upon a time"}
        messages = [{"role": "user", "content": row["text"]}]
    trained = tokenize_row(row, source, tokenizer, recipe.data, "row 0")
    prompt_length = next((i for i, label in enumerate(trained["labels"]) if label != -100), len(trained["labels"]))
    if fmt == "alpaca":
        served_prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert served_prompt == trained["input_ids"][:prompt_length]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == trained["input_ids"][: len(ids)] and len(ids) >= len(trained["input_ids"]) - (fmt == "completion")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"chat template: {fmt}" in card
    with pytest.raises(Exception, match="trained without system messages"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}] + messages, tokenize=False)


TRANSFORMERS4_READ = """
import json, sys
from transformers import AutoConfig
c = AutoConfig.from_pretrained(sys.argv[1])
print(json.dumps({"rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "dtype": str(c.torch_dtype),
                  "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_word_embeddings,
                  "max_position_embeddings": c.max_position_embeddings, "eos_token_id": c.eos_token_id}))
"""


def read_with_transformers4(artifacts: Path, directory: Path) -> dict:
    import subprocess

    python = artifacts / "venvs" / "transformers4" / "bin" / "python"
    done = subprocess.run([str(python), "-c", TRANSFORMERS4_READ, str(directory)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


ROPES = {  # rope_parameters as transformers 5 writes them -> the legacy rope_scaling transformers 4 expects
    "default": ({"rope_theta": 100000.0, "rope_type": "default"}, None),
    "llama3": ({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_exported_config_reads_the_same_in_transformers_4(artifacts, tiny_llama, rope, tmp_path):
    """transformers 5 saves RoPE only as rope_parameters; transformers 4.57 (vLLM and TGI stacks that pin
    it) then reads RoPE base 10000 with no warning. The export's config reads the same in both."""
    from transformers import AutoConfig

    from ftl.export.write import serving_config

    base = json.loads((tiny_llama / "config.json").read_text())
    base["rope_parameters"], legacy_scaling = ROPES[rope]
    for key in ("rope_theta", "rope_scaling"):
        base.pop(key, None)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(base))
    assert read_with_transformers4(artifacts, tmp_path / "base")["rope_theta"] == 10000.0  # the trap
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps(serving_config(base, "bfloat16", untie=False)))
    old = read_with_transformers4(artifacts, tmp_path / "export")
    new = AutoConfig.from_pretrained(tmp_path / "export")
    assert new.rope_parameters == ROPES[rope][0]  # transformers 5 reads what it wrote
    assert old["rope_theta"] == ROPES[rope][0]["rope_theta"] and old["rope_scaling"] == legacy_scaling
    assert old["dtype"] == "bfloat16" and str(new.dtype) == "torch.bfloat16"  # (no torch there: a name)
    for key in ("vocab_size", "tie_word_embeddings", "max_position_embeddings", "eos_token_id"):
        assert old[key] == getattr(new, key) == base[key], key


def test_gguf_conversion_failure_is_one_line_and_leaves_nothing(runs, tmp_path, artifacts):
    """llama.cpp's converter refuses a tokenizer it does not know (the tiny model's, trained on the
    spot); the export fails with its reason and no directory is left at --out."""
    with pytest.raises(UserError, match=r"--gguf: llama.cpp's convert_hf_to_gguf.py failed on the export: .*pre-tokenizer"):
        export(runs("lora"), tmp_path / "out", ExportSection(dtype="float32", gguf="f32"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_converter_that_writes_no_gguf_is_an_error(runs, tmp_path, monkeypatch):
    """--gguf --no-verify: a converter that exits 0 without writing the file is not reported as done."""
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.setenv("FTL_LLAMA_CPP", str(fake))
    with pytest.raises(UserError, match=r"--gguf: .*exited without error but wrote no GGUF file at model-f16.gguf"):
        export(runs("lora"), tmp_path / "out", ExportSection(dtype="float32", gguf="f16", verify=False))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_peft_adapter_trained_elsewhere_exports_verified_against_peft(tiny_llama, tmp_path, capsys, monkeypatch):
    """An adapter from another tool (here: peft directly, as TRL saves it): `ftl export ADAPTER --base DIR`
    merges it and verifies the merge against peft's own base + adapter; verify.json says what is unknown;
    a wrong scale is still caught."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")  # adapter_config.json + adapter_model.safetensors, no run
    capsys.readouterr()
    assert cli_exit_code(["export", str(tmp_path / "adapter"), "--base", str(tiny_llama), "--dtype", "float32"]) == 0
    report = json.loads((tmp_path / "adapter-merged" / "verify.json").read_text())
    assert report["passed"] and report["merge_max_abs_logit_diff"] < 1e-5 and "no training recipe" in report["unknown"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter-merged", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)
    # without --base: its base_model_name_or_path (the local path peft recorded)
    assert cli_exit_code(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "again"), "--no-verify"]) == 0
    real_merge = merge.Adapter.merge
    monkeypatch.setattr(merge.Adapter, "merge", lambda self, name, weight: weight + 1.1 * (real_merge(self, name, weight) - weight))
    assert cli_exit_code(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "bad"), "--dtype", "float32"]) == 2
