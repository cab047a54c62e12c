"""Small read-only questions to the Slurm controller and accounting (sinfo, sacct) and scancel."""
from __future__ import annotations

import functools
import re
import shutil
import subprocess

from puyu.launcher.errors import PuyuError


# States of a job that is not over: it runs, waits, or was requeued and will run again.
ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise PuyuError(f"{cmd[0]} not found: cluster=slurm needs the Slurm client commands on PATH")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise PuyuError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def partitions() -> list[str]:
    """Partition names of this cluster (sinfo marks the default one with a '*')."""
    return sorted({p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split()})


def check_partition(partition: str | None, key: str = "cluster.partition") -> None:
    if partition is None:
        return
    known = partitions()
    if partition not in known:
        raise PuyuError(f"{key}={partition!r} is not a partition of this cluster (available: {', '.join(known)})")


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """The most tasks one array job may have: Slurm's MaxArraySize (array indices run below it; default 1001)."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", _run(["scontrol", "show", "config"]), re.MULTILINE)
    return int(match.group(1)) if match else 1001


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Job (or array task) id -> state, e.g. ``{"12_3": "COMPLETED", "13": "CANCELLED"}``.

    Array jobs are asked for by their array id; sacct lists each task as ``<array>_<index>``.
    """
    if not job_ids:
        return {}
    roots = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(roots)])
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return states


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)
