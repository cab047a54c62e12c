"""The job kinds ``puyu job=<kind>`` knows, and the small built-in ones.

A job kind is a config dataclass plus either a stage builder (``cfg -> list[Stage]``, submitted
as a pipeline) or an action run on the login node (``status``). Builders are named by import
path so the CLI imports a stage's heavy dependencies only when that job runs.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

from puyu.agents.config import AgentJobConfig
from puyu.data_pipeline.config import DataJobConfig
from puyu.evaluation.config import EvalJobConfig
from puyu.launcher.config import JobConfig
from puyu.launcher.distributed import dist_env
from puyu.launcher.stage import Stage, TaskContext
from puyu.launcher.chain import PipelineJobConfig
from puyu.parallel.config import PretrainJobConfig
from puyu.parallel.ft_config import FinetuneJobConfig
from puyu.serving.config import BuildEngineJobConfig, InferJobConfig


@dataclasses.dataclass(frozen=True)
class JobSpec:
    config_cls: type
    stages: Optional[str] = None  # "module:function" -> function(job_cfg) -> list[Stage]
    action: Optional[str] = None  # "module:function" -> function(full_cfg) -> int (exit code), runs here
    report: Optional[str] = None  # "module:function" -> function(job_cfg, run_dir, results) -> report path

    def load(self, attr: str) -> Callable[..., Any]:
        module, _, name = getattr(self, attr).partition(":")
        return getattr(importlib.import_module(module), name)


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


# --------------------------------------------------------------------------- data
@dataclasses.dataclass
class DataJob(JobConfig):
    """Corpus building: read, filter, deduplicate, tokenize into Megatron .bin/.idx shards."""

    data: DataJobConfig = dataclasses.field(default_factory=DataJobConfig)


def data_stages(cfg: DataJob) -> list[Stage]:
    from puyu.data_pipeline.job import build_data_stages

    return build_data_stages(cfg.data)


def data_report(cfg: DataJob, run_dir: Path, results: dict[str, list]) -> Path:
    return run_dir / "summary" / "summary.md"


JOB_KINDS: dict[str, JobSpec] = {
    "pipeline": JobSpec(PipelineJobConfig, stages="puyu.launcher.chain:pipeline_stages",
                        report="puyu.launcher.chain:pipeline_report"),
    "data": JobSpec(DataJob, stages="puyu.launcher.jobs:data_stages", report="puyu.launcher.jobs:data_report"),
    "pretrain": JobSpec(PretrainJobConfig, stages="puyu.parallel.pretrain:pretrain_stages",
                        report="puyu.parallel.pretrain:write_report"),
    "finetune": JobSpec(FinetuneJobConfig, stages="puyu.parallel.finetune:finetune_stages",
                        report="puyu.parallel.finetune:write_report"),
    "build_engine": JobSpec(BuildEngineJobConfig, stages="puyu.serving.build:build_engine_stages"),
    "infer": JobSpec(InferJobConfig, stages="puyu.serving.job:build_infer_stages"),
    "agent": JobSpec(AgentJobConfig, stages="puyu.agents.job:build_agent_stages", report="puyu.agents.job:agent_report"),
    "eval": JobSpec(EvalJobConfig, stages="puyu.evaluation.job:eval_stages", report="puyu.evaluation.job:eval_report"),
    "probe": JobSpec(ProbeJobConfig, stages="puyu.launcher.jobs:probe_stages"),
    "status": JobSpec(StatusJobConfig, action="puyu.launcher.status:print_status"),
}
