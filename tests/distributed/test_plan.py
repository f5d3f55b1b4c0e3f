"""The plan: strategy choice, DeepSpeed JSON and Accelerate config for the shipped GPU recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import load_recipe, validate_recipe
from ftl.distributed.strategies import DistributedError, for_recipe
from ftl.distributed.plan import make_plan, write_launch_files
from conftest import make_recipe

ROOT = Path(__file__).resolve().parents[2]


def recipe_for(tmp_path: Path, **sections):
    return validate_recipe(make_recipe(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "run", **sections))


def plan_for(tmp_path: Path, device: str = "cpu", **sections):
    return make_plan(recipe_for(tmp_path, **sections), device=device)


@pytest.mark.parametrize(
    "method, processes, expected",
    [("lora", 1, "single"), ("lora", 2, "ddp"), ("qlora", 4, "ddp"), ("full", 2, "zero3"), ("full", 1, "single")],
)
def test_auto_strategy(tmp_path, method, processes, expected):
    plan = plan_for(tmp_path, method={"type": method}, distributed={"num_processes": processes})
    assert plan.strategy == expected and plan.world_size == processes


def test_8b_qlora_on_one_gpu_runs_in_process():
    plan = make_plan(load_recipe(ROOT / "recipes/llama3.1-8b-qlora.yaml").resolved(), device="cuda")
    assert plan.strategy == "single" and plan.world_size == 1 and plan.deepspeed is None
    assert plan.command[1:3] == ["-m", "ftl.train"]


def test_8b_full_fine_tuning_on_8_gpus_zero3(tmp_path):
    recipe = load_recipe(ROOT / "recipes/llama3.1-8b-full-zero3.yaml", [f"output.dir={tmp_path}"]).resolved()
    plan = make_plan(recipe, device="cuda")
    ds = plan.deepspeed
    assert plan.strategy == "zero3" and plan.world_size == 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_batch_size"] == 1 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in ds["zero_optimization"]
    acc = plan.accelerate
    assert acc["distributed_type"] == "DEEPSPEED" and acc["num_processes"] == 8 and acc["num_machines"] == 1
    assert "mixed_precision" not in acc  # Accelerate rejects it next to a DeepSpeed JSON
    assert "ACCELERATE_USE_CPU" not in plan.env
    write_launch_files(plan, recipe)
    # Accelerate itself accepts what we wrote, and it points at our DeepSpeed JSON.
    cluster = ClusterConfig.from_yaml_file(str(plan.launch_dir / "accelerate.yaml"))
    assert cluster.deepspeed_config["deepspeed_config_file"] == str(plan.launch_dir / "deepspeed.json")
    assert json.loads((plan.launch_dir / "deepspeed.json").read_text()) == ds
    assert yaml.safe_load((plan.launch_dir / "recipe.yaml").read_text())["distributed"]["num_processes"] == 8
    assert plan.shell_command().endswith(f"-m ftl.train {plan.launch_dir}/recipe.yaml")


def test_70b_qlora_on_2x8_gpus(tmp_path):
    path = ROOT / "recipes/llama3.1-70b-qlora-2x8.yaml"
    plans = [
        make_plan(load_recipe(path, [f"output.dir={tmp_path}", f"distributed.machine_rank={r}"]).resolved(), device="cuda")
        for r in (0, 1)
    ]
    for rank, plan in enumerate(plans):
        assert plan.strategy == "zero3" and plan.world_size == 16 and plan.deepspeed["train_batch_size"] == 64
        acc = plan.accelerate
        assert (acc["num_processes"], acc["num_machines"], acc["machine_rank"]) == (16, 2, rank)
        assert acc["main_process_ip"] == "10.0.0.1" and acc["main_process_port"] == 29500
        # Without "standard", Accelerate starts multi-node DeepSpeed through pdsh.
        assert acc["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
        assert plan.launch_dir == tmp_path / "launch" / f"machine-{rank}"


def test_offload_and_cpu_environment(tmp_path):
    plan = plan_for(tmp_path, method={"type": "full"},
                    distributed={"strategy": "zero3", "num_processes": 2, "zero": {"offload_optimizer": True, "offload_params": True}})
    zero = plan.deepspeed["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "ACCELERATE_USE_CPU" not in plan.env  # it would switch DeepSpeed off
    ddp = plan_for(tmp_path, distributed={"strategy": "ddp", "num_processes": 2})
    assert ddp.env["ACCELERATE_USE_CPU"] == "true" and ddp.accelerate["distributed_type"] == "MULTI_GPU"
    assert ddp.deepspeed is None


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"distributed": {"strategy": "zero3", "num_processes": 1}}, "distributed.num_processes"),
        ({"distributed": {"strategy": "single", "num_processes": 2}}, "distributed.strategy"),
        ({"distributed": {"num_machines": 2, "machine_rank": 2}}, "distributed.machine_rank"),
        ({"distributed": {"strategy": "zero2", "num_processes": 2, "zero": {"offload_params": True}}}, "distributed.zero.offload_params"),
        ({"method": {"type": "qlora"}, "distributed": {"strategy": "fsdp2", "num_processes": 2}}, "quantization.quant_storage"),
        ({"distributed": {"strategy": "zero2", "num_processes": 2}, "train": {"optimizer": "adamw_8bit"}}, "train.optimizer"),
    ],
)
def test_impossible_distributed_settings_fail_at_validation(tmp_path, sections, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        validate_recipe(make_recipe(tmp_path / "m", tmp_path / "t.jsonl", tmp_path / "run", **sections))


def test_guard_rejects_an_unwrapped_model(tmp_path):
    recipe = recipe_for(tmp_path, distributed={"strategy": "ddp", "num_processes": 2})
    with pytest.raises(DistributedError, match="strategy ddp should have wrapped the model, but it is Linear"):
        for_recipe(recipe).check_wrapped(torch.nn.Linear(2, 2))


def test_ftl_plan_json(tmp_path):
    recipe = ROOT / "recipes/llama3.1-8b-full-zero3.yaml"
    out = subprocess.run([sys.executable, "-m", "ftl", "plan", str(recipe), "--json", "--device", "cuda",
                          f"output.dir={tmp_path}", "distributed.num_processes=4", "train.mixed_precision=auto"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["world_size"] == 4 and plan["deepspeed"]["train_batch_size"] == 16
    # auto is decided for the target device; planning for cuda without a GPU assumes a bf16 one
    assert plan["mixed_precision"] == "bf16" and plan["deepspeed"]["bf16"]["enabled"] is True
    assert plan["command"].startswith("OMP_NUM_THREADS=") and "accelerate launch --config_file" in plan["command"]
    assert not (tmp_path / "launch").exists()  # planning writes nothing
    # one process: the command is `ftl train` itself (it writes no launch/ files to point at)
    out = subprocess.run([sys.executable, "-m", "ftl", "plan", str(recipe), f"output.dir={tmp_path}",
                          "distributed.strategy=single", "distributed.num_processes=1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"ftl train {recipe} output.dir={tmp_path}" in out.stdout and "launch/" not in out.stdout.replace("no launch/", "")


def test_zero_and_rendezvous_options_reach_the_configs(tmp_path):
    plan = plan_for(tmp_path, method={"type": "full"}, distributed={
        "strategy": "zero2", "num_processes": 2, "rdzv_backend": "c10d",
        "zero": {"overlap_comm": False, "contiguous_gradients": False, "reduce_bucket_size": 1000, "allgather_bucket_size": 2000}})
    zero = plan.deepspeed["zero_optimization"]
    assert (zero["stage"], zero["overlap_comm"], zero["contiguous_gradients"]) == (2, False, False)
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (1000, 2000)
    assert plan.accelerate["rdzv_backend"] == "c10d"
    z3 = plan_for(tmp_path, method={"type": "full"}, distributed={
        "strategy": "zero3", "num_processes": 2, "zero": {"stage3_prefetch_bucket_size": 7, "stage3_param_persistence_threshold": 9}})
    zero3 = z3.deepspeed["zero_optimization"]
    assert (zero3["stage3_prefetch_bucket_size"], zero3["stage3_param_persistence_threshold"]) == (7, 9)
    assert "allgather_bucket_size" not in zero3
