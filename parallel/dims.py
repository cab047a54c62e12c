"""ParallelDims: the layout of a job's processes, checked before any process group exists.

A world of ``tp × pp × dp_replicate × dp_shard`` ranks. The mesh is laid out outermost-first as
``(pp, dp_replicate, dp_shard, tp)``, so tensor-parallel peers are adjacent ranks (on one node,
where the fastest links are) and pipeline stages are farthest apart. ``dp_shard=-1`` takes
whatever the other dimensions leave.
"""
from __future__ import annotations

import dataclasses
from puyu.launcher.errors import PuyuError


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1  # HSDP: replicas of the sharded group (DDP across, FSDP within)
    dp_shard: int = -1  # FSDP/ZeRO-3 sharding degree; -1 = the rest of the world

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "dp_replicate"):
            if getattr(self, name) < 1:
                raise PuyuError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        others = self.tp * self.pp * self.dp_replicate
        if self.dp_shard == -1:
            if self.world_size % others:
                raise PuyuError(f"world size {self.world_size} is not divisible by tp×pp×dp_replicate = "
                                f"{self.tp}×{self.pp}×{self.dp_replicate} = {others}")
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if self.dp_shard < 1:
            raise PuyuError(f"parallel.dp_shard={self.dp_shard} must be >= 1 or -1")
        if others * self.dp_shard != self.world_size:
            raise PuyuError(f"tp×pp×dp_replicate×dp_shard = {self.tp}×{self.pp}×{self.dp_replicate}×"
                            f"{self.dp_shard} = {others * self.dp_shard} != world size {self.world_size}")

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches are seen per step."""
        return self.dp_replicate * self.dp_shard

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    MESH_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate along each mesh dimension (row-major over ``mesh_shape``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        out = {}
        for name, size in reversed(list(zip(self.MESH_NAMES, self.mesh_shape))):
            out[name] = rank % size
            rank //= size
        return {n: out[n] for n in self.MESH_NAMES}

    def dp_rank(self, rank: int) -> int:
        """Index of the data shard this rank reads: ranks that differ only in tp/pp read the same data."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def build_mesh(self, device_type: str = "cpu"):
        """The torch DeviceMesh (needs an initialised process group) with named dims and a flat ``dp``."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.MESH_NAMES)
        mesh["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="dp")
        return mesh

    def describe(self) -> str:
        return (f"world {self.world_size} = pp {self.pp} × dp_replicate {self.dp_replicate} × "
                f"dp_shard {self.dp_shard} × tp {self.tp}")

