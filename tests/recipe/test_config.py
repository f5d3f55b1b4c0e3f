from pathlib import Path

import pytest

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import load_recipe, validate_recipe
from conftest import make_recipe, write_yaml

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.output.dir


def _recipe_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = """\
model:
  path: some/model
data:
  train: {path: data.jsonl}
method:
  type: lora
  lora:
    rnak: 8
output:
  dir: runs/x
"""


def test_misspelt_key_names_key_line_and_suggestion(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe_file(tmp_path, BASE))
    assert len(err.value.problems) == 1
    line = err.value.problems[0]
    assert "'rnak'" in line and "r.yaml:8" in line and "method.lora.rnak" in line
    assert "'rank'" in line and "'r'" in line


def test_rank_alias_and_r_are_the_same_field(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe_file(tmp_path, BASE.replace("rnak", "rank")))
    assert recipe.method.lora.r == 8


def test_wrong_type_and_range_name_path_and_expectation(tmp_path: Path) -> None:
    text = BASE.replace("rnak: 8", "r: 0") + "train:\n  learning_rate: fast\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe_file(tmp_path, text))
    problems = "\n".join(err.value.problems)
    assert "r.yaml:8: method.lora.r: Input should be greater than or equal to 1 (got 0)" in problems
    assert "r.yaml:12: train.learning_rate: Input should be a valid number" in problems


def test_unknown_section_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe_file(tmp_path, BASE.replace("rnak", "r") + "trian:\n  epochs: 1\n"))
    assert "unknown key 'trian'" in str(err.value) and "did you mean 'train'" in str(err.value)


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="missing required key output"):
        load_recipe(_recipe_file(tmp_path, BASE.replace("rnak", "r").replace("output:\n  dir: runs/x\n", "")))


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = _recipe_file(tmp_path, BASE.replace("rnak", "r"))
    recipe = load_recipe(path, ["train.learning_rate=1e-4", "method.lora.target_modules=[q_proj,v_proj]"])
    assert recipe.train.learning_rate == 1e-4
    assert recipe.method.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match=r"r.yaml \(command-line override\): train.micro_batch_size"):
        load_recipe(path, ["train.micro_batch_size=zero"])
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        load_recipe(path, ["=3"])


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"r.yaml:3: invalid YAML"):
        load_recipe(_recipe_file(tmp_path, "model:\n  path: x\n  bad: a: b\n"))


def test_freeze_needs_full_method(tmp_path: Path) -> None:
    raw = make_recipe(Path("m"), Path("d.jsonl"), tmp_path, method={"type": "lora", "freeze": ["model.*"]})
    with pytest.raises(RecipeError, match="method.freeze: applies to method.type: full"):
        validate_recipe(raw)


def test_single_source_or_list(tmp_path: Path) -> None:
    raw = make_recipe(Path("m"), Path("d.jsonl"), tmp_path)
    raw["data"]["train"] = [{"path": "a.jsonl"}, {"path": "b.jsonl", "format": "chat"}]
    recipe = validate_recipe(raw)
    assert [s.format for s in recipe.data.train] == ["alpaca", "chat"]


def test_resolved_makes_existing_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("")
    recipe = validate_recipe(make_recipe(Path("hub/model"), Path("d.jsonl"), Path("runs/x"))).resolved()
    assert recipe.data.train[0].path == str(tmp_path / "d.jsonl")
    assert recipe.model.path == "hub/model"  # a hub id stays as it is
    assert recipe.output.dir == str(tmp_path / "runs/x")


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = validate_recipe(make_recipe(Path("m"), Path("d.jsonl"), tmp_path))
    again = load_recipe(write_yaml(tmp_path / "again.yaml", __import__("yaml").safe_load(recipe.to_yaml())))
    assert again == recipe


@pytest.mark.parametrize("section, values, message", [
    ("train", {"seed": -1}, "train.seed: Input should be greater than or equal to 0"),
    ("train", {"seed": 2**32}, "train.seed: Input should be less than 4294967296"),
    ("train", {"epochs": float("inf")}, "train.epochs: Input should be a finite number"),
    ("train", {"learning_rate": float("inf")}, "train.learning_rate: Input should be a finite number"),
    ("train", {"learning_rate": float("nan")}, "train.learning_rate: Input should be a finite number"),
    ("method", {"lora": {"alpha": float("inf")}}, "method.lora.alpha: Input should be a finite number"),
    ("train", {"max_grad_norm": float("inf")}, "train.max_grad_norm: Input should be a finite number"),
    ("data", {"train": []}, "data.train: List should have at least 1 item"),
    ("model", {"path": ""}, "model.path: String should have at least 1 character"),
    ("output", {"dir": "/tmp/a\nb"}, "output.dir: Value error, control characters"),
    ("export", {"max_shard_size": "lots"}, "export.max_shard_size: 'lots' is not a size"),
    ("distributed", {"timeout_minutes": 10**12}, "distributed.timeout_minutes: Input should be less than or equal to"),
])
def test_values_that_would_crash_or_train_on_nonsense_are_refused(section, values, message):
    raw = make_recipe(Path("m"), Path("d.jsonl"), Path("runs/x"))
    raw.setdefault(section, {}).update(values)
    if section == "method":
        raw["method"]["lora"] = {**make_recipe(Path("m"), Path("d.jsonl"), Path("r"))["method"]["lora"], **values["lora"]}
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    assert any(message.replace("Value error, ", "") in p for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("key", ["weight", "samples"])
def test_huge_mixing_values_are_refused(key):
    raw = make_recipe(Path("m"), Path("d.jsonl"), Path("runs/x"))
    raw["data"]["train"] = {"path": "d.jsonl", key: 10**12}
    with pytest.raises(RecipeError, match=f"data.train.0.{key}: Input should be less than or equal to"):
        validate_recipe(raw)


def test_strategy_rules_apply_to_what_auto_resolves_to():
    """auto with full fine-tuning on 8 processes is zero3: an 8-bit optimizer is refused as for zero3,
    and optimizer offload is accepted (both were decided on the word 'auto' before)."""
    full = make_recipe(Path("m"), Path("d.jsonl"), Path("runs/x"), method={"type": "full"}, distributed={"num_processes": 8})
    eight_bit = {**full, "train": {**full["train"], "optimizer": "adamw_8bit"}}
    with pytest.raises(RecipeError, match=r"train.optimizer: DeepSpeed \(strategy auto \(here zero3\)\) runs its own"):
        validate_recipe(eight_bit)
    offload = {**full, "distributed": {"num_processes": 8, "zero": {"offload_optimizer": True}}}
    assert validate_recipe(offload).strategy == "zero3"
    lora = {**offload, "method": {"type": "lora"}}
    with pytest.raises(RecipeError, match=r"offload_optimizer: needs strategy zero1, zero2 or zero3, not strategy auto \(here ddp\)"):
        validate_recipe(lora)


def test_validation_does_not_change_the_recipe_it_checks():
    from ftl.recipe import rules
    from ftl.recipe.schema import Recipe

    raw = make_recipe(Path("m"), Path("d.jsonl"), Path("runs/x"), method={"type": "qlora"}, slurm={"nodes": 2, "gpus_per_node": 4})
    recipe = Recipe.model_validate(raw)
    before = recipe.model_dump()
    rules.check(recipe)
    assert recipe.model_dump() == before
    resolved = validate_recipe(raw)
    assert (resolved.quantization.bits, resolved.distributed.num_machines, resolved.distributed.num_processes) == (4, 2, 4)


def test_a_recipe_is_frozen_and_changes_go_through_validation():
    from pydantic import ValidationError

    from ftl.recipe.load import with_values

    recipe = validate_recipe(make_recipe(Path("m"), Path("d.jsonl"), Path("runs/x")))
    with pytest.raises(ValidationError, match="frozen"):
        recipe.train.max_steps = 3
    changed = with_values(recipe, {"train.max_steps": 3, "data.train.0.path": "other.jsonl"})
    assert (changed.train.max_steps, changed.data.train[0].path) == (3, "other.jsonl")
    assert recipe.train.max_steps == 4  # the original is unchanged
    with pytest.raises(RecipeError, match="train.optimizer: DeepSpeed"):
        with_values(changed, {"method.type": "full", "distributed.num_processes": 8, "train.optimizer": "adamw_8bit"})


def test_mixed_precision_auto_is_decided_for_the_device_and_named_values_are_kept(monkeypatch):
    import torch

    raw = make_recipe(Path("m"), Path("d.jsonl"), Path("runs/x"), train={"mixed_precision": "auto"})
    recipe = validate_recipe(raw)
    for flags, expected in [({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16"), ({}, "no")]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False, **flags})
        assert recipe.for_device("cpu").train.mixed_precision == expected
    assert recipe.train.mixed_precision == "auto"  # a copy: the recipe itself is unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in [(True, "bf16"), (False, "no")]:  # Ampere and later; V100, T4
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)
        assert recipe.for_device("cuda").train.mixed_precision == expected
    for named in ("no", "bf16", "fp16"):
        assert validate_recipe({**raw, "train": {**raw["train"], "mixed_precision": named}}).for_device("cpu").train.mixed_precision == named


def test_override_list_indices_are_named(tmp_path):
    """data.train.N.key addresses the N-th source (a single source written as a mapping is item 0);
    an index out of range says how many there are."""
    from ftl.recipe.schema import RecipeError
    from ftl.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\ndata:\n  train:\n  - {path: a.jsonl}\n  - {path: b.jsonl}\n  eval: {path: e.jsonl}\noutput: {dir: r}\n")
    recipe = load_recipe(path, ["data.train.1.format=chat", "data.eval.0.format=chat"])
    assert [s.format for s in recipe.data.train] == ["alpaca", "chat"] and recipe.data.eval[0].format == "chat"
    with pytest.raises(RecipeError, match=r"data.train has 2 item\(s\); '3' is not an index of it \(0 to 1\)"):
        load_recipe(path, ["data.train.3.path=x"])
    with pytest.raises(RecipeError, match=r"data.eval has 1 item; index 2 is out of range"):
        load_recipe(path, ["data.eval.2.path=x"])


def test_dtypes_are_one_vocabulary_with_the_usual_spellings(tmp_path: Path) -> None:
    """bf16/fp16/fp32 where torch's names are expected, bfloat16 where Accelerate's: each field reads
    the other spelling as its own (ftl.precision), and the resolved recipe writes the canonical one."""
    import torch

    from ftl.precision import autocast_dtype, torch_dtype

    recipe = validate_recipe(make_recipe(Path("m"), Path("d.jsonl"), tmp_path, model={"path": "m", "dtype": "bf16"},
                                         method={"type": "qlora"}, quantization={"compute_dtype": "FP16", "quant_storage": "bf16"},
                                         train={"mixed_precision": "bfloat16"}, export={"dtype": "fp32"},
                                         distributed={"fsdp": {"reduce_dtype": "bf16"}}))
    assert (recipe.model.dtype, recipe.quantization.compute_dtype, recipe.quantization.quant_storage) == ("bfloat16", "float16", "bfloat16")
    assert (recipe.train.mixed_precision, recipe.export.dtype, recipe.distributed.fsdp.reduce_dtype) == ("bf16", "float32", "bfloat16")
    assert torch_dtype(recipe.model.dtype) is torch.bfloat16 and autocast_dtype(recipe.train.mixed_precision) is torch.bfloat16
    assert "dtype: bfloat16" in recipe.to_yaml() and "mixed_precision: bf16" in recipe.to_yaml()
    with pytest.raises(RecipeError, match=r"model\.dtype"):
        validate_recipe(make_recipe(Path("m"), Path("d.jsonl"), tmp_path, model={"path": "m", "dtype": "bf17"}))
