"""A stage with more shards than the cluster's MaxArraySize goes to Slurm as several array jobs."""
from __future__ import annotations

import itertools

from puyu.launcher import pipeline as P
from puyu.launcher import slurm
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.stage import Stage

SCONTROL = "Configuration data as of 2026-12-07T10:00:00\nMaxArraySize            = 4\nMaxJobCount = 10000\n"


class FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class FakeExecutor:
    """Records each array it is asked to submit, numbering jobs as sbatch would."""

    arrays: list[list[int]] = []
    ids = itertools.count(100)

    def map_array(self, fn, ranks):
        assert len(ranks) <= 4, f"an array of {len(ranks)} tasks exceeds MaxArraySize 4"
        self.arrays.append(list(ranks))
        root = next(self.ids)
        return [FakeJob(f"{root}_{i}") for i in range(len(ranks))]

    def submit(self, fn, rank):
        self.arrays.append([rank])
        return FakeJob(str(next(self.ids)))


def test_max_array_size_is_read_from_scontrol(monkeypatch):
    monkeypatch.setattr(slurm, "_run", lambda cmd: SCONTROL if cmd[:2] == ["scontrol", "show"] else "")
    slurm.max_array_size.cache_clear()
    try:
        assert slurm.max_array_size() == 4
    finally:
        slurm.max_array_size.cache_clear()


def test_a_stage_over_max_array_size_is_split_into_arrays(tmp_path, monkeypatch):
    FakeExecutor.arrays = []
    monkeypatch.setattr(slurm, "max_array_size", lambda: 4)
    made = []  # (throttle, dependency) of each executor

    def executor(c, folder, name, dependency=None):
        made.append((c.array_parallelism, dependency))
        return FakeExecutor()

    monkeypatch.setattr(P, "make_executor", executor)
    stage = Stage("many", print, shards=10)
    pipe = P.Pipeline([stage], tmp_path, ClusterConfig(kind=ClusterKind.slurm, array_parallelism=5), LauncherConfig())
    sub = pipe._submit(stage, list(range(10)), "afterok:7")
    assert FakeExecutor.arrays == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sub.ranks == list(range(10)) and len(sub.jobs) == 10
    roots = sorted({j.split("_")[0] for j in sub.job_ids()})
    assert len(roots) == 3  # the next stage waits on all
    assert made == [(2, "afterok:7"), (2, "afterok:7"), (1, "afterok:7")]  # the throttle of 5, shared
    # a throttle below the array count: one task at a time per array, array j after array j - 2
    made.clear()
    pipe = P.Pipeline([stage], tmp_path, ClusterConfig(kind=ClusterKind.slurm, array_parallelism=2), LauncherConfig())
    sub = pipe._submit(stage, list(range(10)))
    first = sorted({j.split("_")[0] for j in sub.job_ids()})[0]
    assert made == [(1, None), (1, None), (1, f"afterany:{first}")]
