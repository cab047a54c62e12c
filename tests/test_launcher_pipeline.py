"""The launcher on real executors: the same callables under cluster=local (subprocesses) and on the
real test Slurm cluster (cluster=slurm), plus inline. Slurm-only behaviour lives in test_launcher_slurm.py."""
from __future__ import annotations

import json

import pytest

import jobs_for_tests as J
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.errors import StageFailed
from puyu.launcher.pipeline import Pipeline
from puyu.launcher.stage import Stage


def _kind(request):
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")
    return ClusterKind(request.param)


@pytest.fixture(params=["inline", "local", "slurm"])
def cluster_kind(request):
    return _kind(request)


@pytest.fixture(params=["local", "slurm"])
def executor_kind(request):
    """Kinds with real task processes (inline has one process and no task ranks)."""
    return _kind(request)


def run(stages, run_dir, kind, **cluster):
    c = ClusterConfig(kind=kind, time_min=10, signal_delay_s=30, **cluster)
    return Pipeline(stages, run_dir, c, LauncherConfig(poll_s=0.5)).run()


def test_result_comes_back(tmp_path, cluster_kind):
    results = run([Stage("echo", J.echo)], tmp_path, cluster_kind)
    assert results["echo"][0]["shard"] == 0 and results["echo"][0]["world_size"] == 1


def test_array_runs_every_shard_within_throttle(tmp_path, cluster_kind):
    results = run([Stage("timed", J.Timed(1.0), shards=8)], tmp_path, cluster_kind, array_parallelism=2)
    assert len(results["timed"]) == 8
    spans = [json.loads((tmp_path / "timed" / "times" / f"{r}.json").read_text()) for r in range(8)]
    # the most shards running at any one instant never exceeds the throttle
    overlap = max(sum(s["start"] <= t["start"] < s["end"] for s in spans) for t in spans)
    assert 1 <= overlap <= 2
    if cluster_kind is ClusterKind.slurm:
        assert overlap == 2, "8 one-second shards with %2 on 4 nodes should run two at a time"


def test_second_stage_starts_after_first_succeeds(tmp_path, cluster_kind):
    run([Stage("first", J.Timed(2.0), shards=2), Stage("second", J.Timed(0.0))], tmp_path, cluster_kind)
    ends = [json.loads((tmp_path / "first" / "times" / f"{r}.json").read_text())["end"] for r in range(2)]
    start2 = json.loads((tmp_path / "second" / "times" / "0.json").read_text())["start"]
    assert start2 >= max(ends)


def test_failed_stage_stops_the_pipeline_and_names_task_and_log(tmp_path, cluster_kind):
    with pytest.raises(StageFailed) as info:
        run([Stage("bad", J.fail, shards=2), Stage("after", J.Timed(0.0))], tmp_path, cluster_kind)
    err = info.value
    assert err.stage == "bad" and "boom in shard" in str(err)
    if cluster_kind is not ClusterKind.inline:
        log_text = open(err.log_path).read()
        assert "boom in shard" in log_text
    assert not (tmp_path / "after" / "times").exists(), "stage 2 ran although stage 1 failed"
    assert not (tmp_path / "after" / "completions").exists()


def test_rerun_skips_finished_shards(tmp_path, cluster_kind):
    stage = Stage("timed", J.Timed(0.0), shards=3)
    run([stage], tmp_path, cluster_kind)
    first = [json.loads((tmp_path / "timed" / "times" / f"{r}.json").read_text()) for r in range(3)]
    (tmp_path / "timed" / "completions" / "00001").unlink()
    run([stage], tmp_path, cluster_kind)
    second = [json.loads((tmp_path / "timed" / "times" / f"{r}.json").read_text()) for r in range(3)]
    assert first[0] == second[0] and first[2] == second[2], "finished shards were redone"
    assert first[1] != second[1], "the shard without a marker was not redone"


def test_multi_task_job_sees_ranks(tmp_path, executor_kind):
    run([Stage("echo", J.echo)], tmp_path, executor_kind, tasks_per_node=2)
    ranks = [json.loads(p.read_text()) for p in (tmp_path / "echo" / "ranks").glob("*.json")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert {r["world_size"] for r in ranks} == {2}
    assert len({(r["master_addr"], r["master_port"]) for r in ranks}) == 1
