"""Resume safety: stage fingerprints refuse (or overwrite) a rerun with other settings; the run lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import jobs_for_tests as J
from puyu.launcher import runguard
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.errors import PuyuError
from puyu.launcher.pipeline import Pipeline
from puyu.launcher.stage import Stage


def run(stages, run_dir, config_yaml=None, **launcher):
    return Pipeline(stages, run_dir, ClusterConfig(kind=ClusterKind.inline), LauncherConfig(**launcher),
                    config_yaml=config_yaml).run()


def two_stages(a=1, shards=2):
    return [Stage("first", J.Timed(0.0), shards=shards, config={"filters": {"a": a}}), Stage("second", J.Timed(0.0))]


def test_changed_settings_are_refused_in_one_line_naming_the_key(tmp_path):
    run(two_stages(), tmp_path)
    with pytest.raises(PuyuError) as info:
        run(two_stages(a=2), tmp_path)
    msg = str(info.value)
    assert "stage 'first'" in msg and "filters.a: 1 -> 2" in msg and "launcher.overwrite=true" in msg
    assert "\n" not in msg
    with pytest.raises(PuyuError, match="shards: 2 -> 3"):
        run(two_stages(shards=3), tmp_path)
    with pytest.raises(PuyuError, match="stage 'second'.*stage before: 'first' -> 'other'"):
        run([Stage("other", J.Timed(0.0)), Stage("second", J.Timed(0.0))], tmp_path)
    assert not (tmp_path / runguard.LOCK).exists(), "a refused launch left its lock behind"


def test_a_refused_rerun_keeps_the_run_config(tmp_path):
    run(two_stages(), tmp_path, config_yaml="a: 1\n")
    with pytest.raises(PuyuError):
        run(two_stages(a=2), tmp_path, config_yaml="a: 2\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    run(two_stages(a=2), tmp_path, config_yaml="a: 2\n", overwrite=True)
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"


def test_overwrite_clears_the_changed_stage_and_later_ones(tmp_path):
    run(two_stages(), tmp_path)
    (tmp_path / "first" / "stale.txt").write_text("old output")
    before = json.loads((tmp_path / "second" / "times" / "0.json").read_text())
    run(two_stages(a=2, shards=3), tmp_path, overwrite=True)
    assert not (tmp_path / "first" / "stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "first" / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert json.loads((tmp_path / "second" / "times" / "0.json").read_text()) != before, "second was not redone"
    recorded = json.loads((tmp_path / runguard.FINGERPRINTS).read_text())
    assert recorded["first"] == {"shards": 3, "after": None, "config": {"filters": {"a": 2}}}
    run(two_stages(a=2, shards=3), tmp_path)  # the same settings resume without complaint


def test_a_live_launcher_holds_the_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-12-04T10:00:00", "job_ids": []}
        (tmp_path / runguard.LOCK).write_text(json.dumps(lock))
        with pytest.raises(PuyuError, match=f"locked by the launcher pid {holder.pid} on {socket.gethostname()}"):
            run(two_stages(), tmp_path)
        assert not (tmp_path / "first").exists(), "a second launcher ran stages"
    finally:
        holder.kill()
        holder.wait()
    run(two_stages(), tmp_path)  # its pid is gone: the lock is stale and taken over
    assert not (tmp_path / runguard.LOCK).exists()


def test_a_lock_holds_while_its_slurm_jobs_are_queued(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"host": "login2", "pid": dead.pid, "started": "2026-12-04T10:00:00", "job_ids": ["41_0", "41_1", "42"]}
    (tmp_path / runguard.LOCK).write_text(json.dumps(lock))
    states = {"41_0": "COMPLETED", "41_1": "COMPLETED", "42": "PENDING"}
    monkeypatch.setattr(runguard.slurm, "sacct_states", lambda ids: {j: states[j] for j in ids})
    with pytest.raises(PuyuError, match="its jobs 41_0,41_1,42 are queued or running"):
        run(two_stages(), tmp_path)
    states["42"] = "COMPLETED"
    run(two_stages(), tmp_path)


def test_two_launchers_at_once_one_runs(tmp_path):
    """Two real processes start the same run: one runs it, the other stops naming the lock."""
    script = ("import sys; sys.path.insert(0, 'tests'); import jobs_for_tests as J\n"
              "from puyu.launcher.stage import Stage\n"
              f"J.run_inline([Stage('slow', J.Timed(5.0))], {str(tmp_path)!r})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    assert sum("is locked by the launcher" in err for _, err in outs) == 1, outs
    assert len(list((tmp_path / "slow" / "completions").iterdir())) == 1
    assert os.listdir(tmp_path).count(runguard.LOCK) == 0
