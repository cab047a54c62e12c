"""``puyu job=status run=<dir>``: what each stage of a run did, from markers, launch.json and sacct."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig
from submitit.core.utils import JobPaths

from puyu.launcher import slurm
from puyu.launcher.errors import PuyuError
from puyu.launcher.pipeline import MANIFEST
from puyu.launcher.stage import COMPLETIONS, PROGRESS

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def stage_status(run_dir: Path) -> list[dict]:
    """One row per stage: shards done, Slurm states of its latest submission, failed tasks' logs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PuyuError(f"run directory {run_dir} does not exist")
    manifest_path = run_dir / MANIFEST
    if not manifest_path.exists():
        raise PuyuError(f"{run_dir} is not a puyu run directory: {MANIFEST} is missing")
    try:
        submissions = json.loads(manifest_path.read_text())["submissions"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise PuyuError(f"{manifest_path}: unreadable launch manifest ({exc})") from exc
    latest = {}
    for sub in submissions:  # later submissions (reruns) replace earlier ones
        latest[sub["stage"]] = sub
    slurm_ids = [j for s in latest.values() if s["cluster"] == "slurm" for j in s["job_ids"]]
    states = slurm.sacct_states(slurm_ids) if slurm_ids else {}
    rows = []
    for name, sub in latest.items():
        done = len(list((run_dir / name / COMPLETIONS).glob("[0-9]*")))
        job_states = {j: states.get(j, "UNKNOWN" if sub["cluster"] == "slurm" else "-") for j in sub["job_ids"]}
        failed = [str(JobPaths(Path(sub["log_dir"]) / "%j", job_id=j, task_id=0).stderr)
                  for j, st in job_states.items() if st in FAILED_STATES]
        summary = ", ".join(f"{n} {st}" for st, n in sorted(Counter(job_states.values()).items()))
        rows.append({"stage": name, "done": done, "shards": sub["shards"], "states": summary, "failed_logs": failed,
                     "progress": _shard_progress(run_dir / name)})
    return rows


def _shard_progress(stage_dir: Path) -> list[str]:
    """The last progress line of each shard still running (no completion marker), oldest report first."""
    lines = []
    for path in sorted((stage_dir / PROGRESS).glob("[0-9]*.json")):
        if (stage_dir / COMPLETIONS / path.stem).exists():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a progress file is advisory; the markers are the truth
        lines.append(f"{record['line']} (reported {time.strftime('%H:%M:%S', time.localtime(record['time']))})")
    return lines


def print_status(cfg: DictConfig) -> int:
    rows = stage_status(Path(cfg.run))
    print(f"run {cfg.run}")
    for r in rows:
        state = "complete" if r["done"] == r["shards"] else "incomplete"
        print(f"  {r['stage']:<16} {r['done']}/{r['shards']} shards done ({state}); jobs: {r['states']}")
        for line in r["progress"]:
            print(f"      {line}")
        for path in r["failed_logs"]:
            print(f"      failed task log: {path}")
    return 0 if all(r["done"] == r["shards"] for r in rows) else 1
