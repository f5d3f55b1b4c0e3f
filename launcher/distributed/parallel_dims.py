"""How a run's processes factor into parallel axes, decided once (after torchtitan's ``ParallelDims``).

``world = dp_replicate x dp_shard x sp``. The data-parallel ranks (``dp = dp_replicate x dp_shard``)
read different rows; the ranks of one sequence-parallel group (``sp``, the innermost axis) would
read the same rows and split each sequence between them. Whatever splits or counts data (batches,
streams, eval rows, rows per second) asks for the data-parallel rank and degree, never the world
size, so a sequence axis can be added without touching the training loop. No recipe setting makes
``sp`` larger than 1 yet: that axis arrives with long-context training.

The strategy decides how its data-parallel ranks hold the model: DDP replicates it
(``dp_replicate``), ZeRO and FSDP2 shard it (``dp_shard``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

AXES = ("dp_replicate", "dp_shard", "sp")  # outermost first: a rank's sp group is consecutive ranks


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel dims: {axis} is {getattr(self, axis)}; every axis has at least 1 rank")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.sp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches one step reads at a time."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """Which data-parallel slice of the data the process of global ``rank`` reads."""
        self._check_rank(rank)
        return rank // self.sp

    def sp_rank(self, rank: int) -> int:
        """Which part of each sequence the process of global ``rank`` holds."""
        self._check_rank(rank)
        return rank % self.sp

    @property
    def gradient_ranks(self) -> int:
        """How many ranks the strategies average gradients over (every data- and sequence-parallel
        rank): the loss normaliser multiplies by it to turn their mean into the sum it divides."""
        return self.dp * self.sp

    def mesh(self, device_type: str) -> DeviceMesh:
        """The device mesh over every rank, one named dimension per axis of more than one rank
        (``dp_shard`` alone where there is none)."""
        from torch.distributed.device_mesh import init_device_mesh

        dims = [(axis, getattr(self, axis)) for axis in AXES if getattr(self, axis) > 1] or [("dp_shard", 1)]
        return init_device_mesh(device_type, tuple(size for _, size in dims), mesh_dim_names=tuple(axis for axis, _ in dims))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"parallel dims: rank {rank} is outside the world of {self.world_size}")
