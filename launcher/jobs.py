"""The launcher's own job kinds: ``probe`` (check an allocation) and ``status`` (a run's state).

Every other kind is declared by the package that implements it (:mod:`puyu.launcher.registry`); these
register through the same ``puyu.jobs`` entry point as theirs.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Optional

from puyu.launcher.config import JobConfig
from puyu.launcher.distributed import dist_env
from puyu.launcher.registry import JobSpec, Registry
from puyu.launcher.stage import Stage, TaskContext


# --------------------------------------------------------------------------- probe
@dataclasses.dataclass
class ProbeJobConfig(JobConfig):
    """Check an allocation: every task reports host, shard and torch.distributed-style ranks."""

    shards: int = 1
    message: str = "hello"
    sleep_s: float = 0.0
    fail_rank: Optional[int] = None  # make this shard raise, to see how failures are reported


@dataclasses.dataclass
class ProbeTask:
    cfg: ProbeJobConfig

    def __call__(self, ctx: TaskContext) -> dict:
        if self.cfg.sleep_s:
            time.sleep(self.cfg.sleep_s)
        if self.cfg.fail_rank == ctx.rank:
            raise RuntimeError(f"probe shard {ctx.rank} failed on purpose (job.fail_rank={ctx.rank})")
        env = dist_env()
        out = {"message": self.cfg.message, "host": socket.gethostname(), "pid": os.getpid(),
               "shard": ctx.rank, "shards": ctx.world_size, **dataclasses.asdict(env)}
        print(f"probe: {out}", flush=True)
        return out


def probe_stages(cfg: ProbeJobConfig) -> list[Stage]:
    return [Stage("probe", ProbeTask(cfg), shards=cfg.shards)]


# --------------------------------------------------------------------------- status
@dataclasses.dataclass
class StatusJobConfig(JobConfig):
    """``puyu job=status run=<dir>``: each stage's state (from sacct) and the failed tasks' logs."""


def register(registry: Registry) -> None:
    registry.add_job("probe", JobSpec(ProbeJobConfig, stages="puyu.launcher.jobs:probe_stages"))
    registry.add_job("status", JobSpec(StatusJobConfig, action="puyu.launcher.status:print_status"))
