"""ParallelDims checks layouts without a process group."""
import pytest

from puyu.launcher.errors import PuyuError
from puyu.parallel.dims import ParallelDims


def test_dp_shard_takes_the_rest():
    d = ParallelDims(world_size=8, tp=2, pp=2)
    assert d.dp_shard == 2 and d.dp == 2 and d.mesh_shape == (2, 1, 2, 2)


@pytest.mark.parametrize("kw,msg", [
    (dict(world_size=6, tp=4), "not divisible by tp×pp×dp_replicate"),
    (dict(world_size=8, tp=2, pp=2, dp_shard=3), "!= world size 8"),
    (dict(world_size=4, tp=0), "parallel.tp=0 must be >= 1"),
])
def test_bad_layouts_are_named(kw, msg):
    with pytest.raises(PuyuError, match=msg):
        ParallelDims(**kw)


def test_tp_peers_are_adjacent_and_share_data():
    d = ParallelDims(world_size=8, tp=2, pp=2, dp_shard=2)
    assert [d.coords(r)["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert d.coords(7) == {"pp": 1, "dp_replicate": 0, "dp_shard": 1, "tp": 1}
    assert [d.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_hsdp_data_ranks_cover_every_replica_and_shard():
    d = ParallelDims(world_size=8, dp_replicate=2, dp_shard=4)
    assert sorted(d.dp_rank(r) for r in range(8)) == list(range(8))
