"""How processes factor into parallel axes (ftl.distributed.parallel_dims): the rank arithmetic the data split
uses agrees with torch's device mesh, and each strategy factors its world as it holds the model."""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from ftl.distributed import strategies
from ftl.recipe.load import validate_recipe
from ftl.data.sources import batch_indices
from ftl.distributed.parallel_dims import ParallelDims
from conftest import make_recipe

SHAPES = [ParallelDims(dp_replicate=2, dp_shard=2, sp=2), ParallelDims(dp_shard=4), ParallelDims(dp_replicate=3),
          ParallelDims(dp_shard=2, sp=3), ParallelDims()]


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_rank_arithmetic_is_the_device_meshs(dims):
    """Every rank's data-parallel and sequence-parallel coordinates, as torch's mesh lays them out
    (a fake process group stands in for the other ranks)."""
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            mesh = dims.mesh("cpu")
            coords = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
        finally:
            dist.destroy_process_group()
        assert dims.sp_rank(rank) == coords.get("sp", 0)
        assert dims.dp_rank(rank) == coords.get("dp_replicate", 0) * dims.dp_shard + coords.get("dp_shard", 0)
        assert set(mesh.mesh_dim_names) == ({axis for axis in ("dp_replicate", "dp_shard", "sp") if getattr(dims, axis) > 1}
                                            or {"dp_shard"})


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_data_is_split_over_data_parallel_ranks_only(dims):
    """The ranks of one sequence-parallel group read the same batches; the data-parallel ranks read
    disjoint batches that together are the epoch's (less what not every rank would get)."""
    per_rank = [batch_indices(100, 4, seed=0, epoch=1, rank=dims.dp_rank(r), world=dims.dp) for r in range(dims.world_size)]
    for r in range(dims.world_size):
        assert per_rank[r] == per_rank[r - dims.sp_rank(r)]  # the first rank of its sp group
    first_of_groups = [per_rank[r] for r in range(0, dims.world_size, dims.sp)]
    rows = [i for batches in first_of_groups for batch in batches for i in batch]
    assert len(rows) == len(set(rows)) and len(rows) == (25 // dims.dp) * dims.dp * 4
    assert dims.gradient_ranks == dims.world_size == dims.dp * dims.sp


def test_bad_axes_and_ranks_are_refused():
    with pytest.raises(ValueError, match="sp is 0"):
        ParallelDims(dp_shard=2, sp=0)
    with pytest.raises(ValueError, match="rank 4 is outside the world of 4"):
        ParallelDims(dp_replicate=2, sp=2).dp_rank(4)


@pytest.mark.parametrize("name, processes", [("single", 1), *itertools.product(["ddp", "zero1", "zero2", "zero3", "fsdp2"], [2, 8])])
def test_each_strategy_factors_its_world(tmp_path, name, processes):
    """DDP replicates the model over its data-parallel ranks; ZeRO and FSDP2 shard it. DeepSpeed's
    global batch counts data-parallel ranks."""
    recipe = validate_recipe(make_recipe(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run", method={"type": "full"},
                                         train={"micro_batch_size": 2, "gradient_accumulation_steps": 3},
                                         distributed={"strategy": name, "num_processes": processes}))
    strategy = strategies.for_recipe(recipe)
    dims = strategy.dims
    assert (dims.world_size, dims.dp, dims.sp) == (processes, processes, 1)
    assert dims.dp_shard == (processes if name in ("zero1", "zero2", "zero3", "fsdp2") else 1)
    if strategy.uses_deepspeed:
        assert strategy.deepspeed_config("cpu")["train_batch_size"] == 2 * 3 * dims.dp
