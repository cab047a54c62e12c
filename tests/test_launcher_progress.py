"""Long tasks report how far they are: throttled log lines and per-shard files that ``job=status`` prints."""
from __future__ import annotations

import json
import logging

from puyu.launcher import stage as stage_mod
from puyu.launcher.stage import TaskContext
from puyu.launcher.status import stage_status


def _manifest(run_dir, stage, shards):
    sub = {"stage": stage, "cluster": "local", "job_ids": ["1"], "shards": shards, "log_dir": str(run_dir / "logs")}
    (run_dir / "launch.json").write_text(json.dumps({"submissions": [sub]}))


def test_progress_lines_are_throttled_and_status_shows_running_shards(tmp_path, monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(stage_mod.time, "monotonic", lambda: clock[0])
    ctx = [TaskContext(tmp_path, tmp_path / "infer", rank, 2) for rank in range(2)]
    with caplog.at_level(logging.INFO, logger="puyu.progress"):
        p = ctx[0].progress("requests", total=400, done=100)  # resumed: 100 were done before
        for _ in range(50):
            p.update(2)
        assert not caplog.records, "reported before PROGRESS_EVERY_S passed"
        clock[0] += stage_mod.PROGRESS_EVERY_S
        p.update(0)
        q = ctx[1].progress("requests")
        q.update(7)
        q.close()
    assert [r.getMessage() for r in caplog.records] == [
        "infer shard 0/2: 200/400 requests (50%) [10 s, 10.0 requests/s, eta 20 s]",
        "infer shard 1/2: 7 requests [0 s]",
    ]
    _manifest(tmp_path, "infer", 2)
    ctx[1].mark_done({"requests": 7})  # a finished shard's progress is not shown
    (row,) = stage_status(tmp_path)
    assert row["done"] == 1 and len(row["progress"]) == 1
    assert row["progress"][0].startswith("infer shard 0/2: 200/400 requests (50%)")


def test_unreadable_progress_file_does_not_break_status(tmp_path):
    (tmp_path / "data" / "progress").mkdir(parents=True)
    (tmp_path / "data" / "progress" / "00000.json").write_text("{torn")
    _manifest(tmp_path, "data", 1)
    (row,) = stage_status(tmp_path)
    assert row["progress"] == [] and row["done"] == 0
