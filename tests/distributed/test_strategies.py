"""Each strategy class on its own: its rules, memory terms and launch files (the wrapping, step and
checkpoint hooks run in tests/distributed/test_distributed.py, test_sharding.py and test_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from ftl.distributed import strategies
from ftl.recipe.load import validate_recipe
from ftl.distributed.plan import make_plan, write_launch_files
from conftest import make_recipe

MULTI = ["ddp", "zero1", "zero2", "zero3", "fsdp2"]


def _recipe(tmp_path: Path, name: str, **sections):
    processes = 1 if name == "single" else 4
    return validate_recipe(make_recipe(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run", method={"type": "full"},
                                       distributed={"strategy": name, "num_processes": processes}, **sections))


def test_every_strategy_is_registered_and_resolves_from_the_recipe(tmp_path):
    for name in ["single", *MULTI]:
        strategy = strategies.for_recipe(_recipe(tmp_path, name))
        assert strategy.name == name and strategy.check() == []
        assert strategy.world_size == (1 if name == "single" else 4)


@pytest.mark.parametrize("name", ["single", *MULTI])
def test_memory_terms_lose_no_bytes(tmp_path, name):
    """Sharding divides by the world size, offload moves to CPU: across all devices and the CPU,
    at least the unsharded bytes remain (gathered layers add a little)."""
    strategy = strategies.for_recipe(_recipe(tmp_path, name))
    weights, gradients, optimizer, layer = 8e9, 8e9, 32e9, 0.1e9
    w, g, o, cpu = strategy.place(weights, gradients, optimizer, layer)
    world = strategy.world_size
    assert (w + g + o) * world + cpu >= weights + gradients + optimizer
    buckets = gradients if name == "ddp" else 0  # DDP's all-reduce buckets: a second copy of the gradients
    assert w <= weights + buckets and g <= gradients and o <= optimizer
    if name in ("zero1", "zero2", "zero3", "fsdp2"):
        assert o == optimizer / world
    assert (g < gradients) == (name in ("zero2", "zero3", "fsdp2"))
    assert (w < weights) == (name in ("zero3", "fsdp2"))


@pytest.mark.parametrize("name", MULTI)
def test_launch_files_load_in_accelerate(tmp_path, name):
    recipe = _recipe(tmp_path, name)
    plan = make_plan(recipe, device="cuda")
    write_launch_files(plan, recipe)
    cluster = ClusterConfig.from_yaml_file(str(plan.launch_dir / "accelerate.yaml"))
    assert cluster.num_processes == 4
    deepspeed = name.startswith("zero")
    assert (cluster.distributed_type.value == "DEEPSPEED") == deepspeed
    assert (plan.deepspeed is not None) == deepspeed == (plan.launch_dir / "deepspeed.json").is_file()
    if deepspeed:
        assert plan.deepspeed["zero_optimization"]["stage"] == int(name[-1])
    assert yaml.safe_load((plan.launch_dir / "recipe.yaml").read_text())["distributed"]["strategy"] == name


def test_a_rule_is_decided_by_the_strategy_auto_resolves_to(tmp_path):
    """Offload of the optimizer: zero3 runs it, ddp refuses it, whether named or chosen by auto."""
    offload = {"zero": {"offload_optimizer": True}, "num_processes": 4}
    full = make_recipe(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run", method={"type": "full"}, distributed=offload)
    assert strategies.for_recipe(validate_recipe(full)).name == "zero3"
    lora = {**full, "method": {"type": "lora"}}
    from ftl.recipe.schema import Recipe
    from ftl.recipe.load import with_implied

    assert [key for key, _ in strategies.for_recipe(with_implied(Recipe.model_validate(lora))).check()] == [
        ("distributed", "zero", "offload_optimizer")]


@pytest.mark.parametrize("name", ["single", *MULTI])
def test_compile_is_refused_only_under_deepspeed(tmp_path, name):
    """train.compile: the layers are compiled in place, which DeepSpeed's engine hooks are not run with."""
    from ftl.recipe.schema import RecipeError

    if name.startswith("zero"):
        with pytest.raises(RecipeError, match="train.compile: not supported under DeepSpeed"):
            _recipe(tmp_path, name, train={"compile": True})
    else:
        assert _recipe(tmp_path, name, train={"compile": True}).train.compile
