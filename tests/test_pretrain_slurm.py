"""Pretraining on the real Slurm cluster: 2 nodes × 2 tasks, real data-stage output, requeue."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.pipeline import Pipeline
from puyu.launcher.stage import Stage
from puyu.parallel.config import ModelConfig, ParallelConfig, PretrainDataConfig, PretrainJobConfig, TrainConfig
from puyu.parallel.pretrain import PretrainTask

STEPS = 60


def config(corpus: Path) -> PretrainJobConfig:
    return PretrainJobConfig(
        kind="pretrain", model=ModelConfig(flavor="tiny", vocab_size=2000),
        data=PretrainDataConfig(paths=[str(corpus / "summary" / "corpus")], seq_len=64), parallel=ParallelConfig(tp=2),
        train=TrainConfig(steps=STEPS, global_batch=8, micro_batch=2, checkpoint_every=5, threads=1, export=False))


def pipeline(cfg, run_dir) -> Pipeline:
    cluster = ClusterConfig(kind=ClusterKind.slurm, nodes=2, tasks_per_node=2, time_min=20, signal_delay_s=30)
    return Pipeline([Stage("pretrain", PretrainTask(cfg))], run_dir, cluster, LauncherConfig(poll_s=0.5))


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "pretrain" / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow(reason="2 nodes x 2 ranks, a full run and a requeued one, ~150 s; test_finetune's Slurm requeue covers the loop")
def test_requeued_pretraining_resumes_with_the_same_losses(slurm_corpus, tmp_path):
    corpus, _ = slurm_corpus
    straight = tmp_path / "straight"
    result = pipeline(config(corpus), straight).run()["pretrain"][0]
    assert result["layout"] == "world 4 = pp 1 × dp_replicate 1 × dp_shard 2 × tp 2"
    reference = losses(straight)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert (straight / "pretrain" / "checkpoints" / f"step-{STEPS:08d}" / "complete.json").exists()

    requeued = tmp_path / "requeued"
    p = pipeline(config(corpus), requeued)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("results", p.run()), daemon=True)
    thread.start()
    end = time.time() + 180
    while max(losses(requeued), default=0) < 8 and time.time() < end:
        time.sleep(0.2)
    assert max(losses(requeued), default=0) >= 8, "training did not reach step 8"
    subprocess.run(["scontrol", "requeue", p.submitted[0].job_ids()[0]], check=True)
    thread.join(600)
    assert not thread.is_alive() and "results" in outcome, "the requeued job did not finish"
    resumed = losses(requeued)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-5 * abs(reference[step]), step
    log_text = "".join(p.read_text() for p in (requeued / "pretrain" / "logs").rglob("*_log.err"))
    assert "resumed from" in log_text, "the job finished without being restarted from a checkpoint"
    # the resumed run's progress counts from its checkpoint: job=status and the log see the whole count
    progress = json.loads((requeued / "pretrain" / "progress" / "00000.json").read_text())
    assert progress["n"] == progress["total"] == STEPS, progress
    assert f"pretrain shard 0/1: {STEPS}/{STEPS} steps (100%)" in log_text
