"""FSDP2 options reach fully_shard (one gloo process, in this process), and Slurm options reach the script."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from ftl.recipe.load import validate_recipe
from ftl.distributed import strategies
from ftl.distributed.slurm import render
from conftest import make_recipe


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("reshard, param_dtype, expected_dtype", [(True, "auto", torch.float32), (False, "bfloat16", torch.bfloat16)])
def test_fsdp_options(process_group, tiny_llama, demo_data, tmp_path, reshard, param_dtype, expected_dtype):
    recipe = validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "run", method={"type": "full"},
                                         distributed={"fsdp": {"reshard_after_forward": reshard, "param_dtype": param_dtype}}))
    model = strategies.build("fsdp2", recipe).shard(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), torch.device("cpu"))
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == expected_dtype  # the mixed-precision policy's compute dtype
    layer_weight = model.model.layers[0].self_attn.q_proj.weight
    # After forward, a layer keeps its gathered (plain) parameters only without resharding.
    assert isinstance(layer_weight, DTensor) == reshard


def test_slurm_options_reach_the_script(tiny_llama, demo_data, tmp_path):
    recipe = validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "run", slurm={
        "nodes": 2, "account": "proj", "qos": "high", "mem": "500G", "cpus_per_task": 16, "output_dir": str(tmp_path / "logs"),
        "extra_sbatch": ["--exclusive"], "setup": ["module load cuda/12.4"], "container_image": "nvcr.io/x:1",
        "container_mounts": "/data:/data", "max_restarts": 2, "port": 29999}))
    script = render(recipe)
    for line in ("#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --mem=500G", "#SBATCH --cpus-per-task=16",
                 f"#SBATCH --output={tmp_path}/logs/%x-%j.out", "#SBATCH --exclusive", "module load cuda/12.4", "PORT=29999",
                 "--container-image=nvcr.io/x:1 --container-mounts=/data:/data", '-lt 2 ]'):
        assert line in script, line
    export = render(recipe, "export")
    assert "#SBATCH --nodes=1" in export and "-m ftl export" in export and "--signal" not in export
