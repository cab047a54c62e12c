"""What the data package adds to ``puyu``: the ``data`` job kind and the chain's first step.

Registered through the ``puyu.jobs`` entry point (see :mod:`puyu.launcher.registry`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from puyu.data_pipeline import layout
from puyu.data_pipeline.config import DataJobConfig
from puyu.launcher.config import JobConfig
from puyu.launcher.registry import ChainStep, JobSpec, Registry
from puyu.launcher.stage import Stage


@dataclasses.dataclass
class DataJob(JobConfig):
    """Corpus building: read, filter, deduplicate, tokenize into Megatron .bin/.idx shards."""

    data: DataJobConfig = dataclasses.field(default_factory=DataJobConfig)


def data_stages(cfg: DataJob) -> list[Stage]:
    from puyu.data_pipeline.job import build_data_stages

    return build_data_stages(cfg.data)


def data_report(cfg: DataJob, run_dir: Path, results: dict[str, list]) -> Path:
    return run_dir / layout.SUMMARY / "summary.md"


def chain_stages(cfg: Any, run) -> list[Stage]:
    from puyu.data_pipeline.job import build_data_stages

    return build_data_stages(cfg.data)


def chain_report(cfg: Any, run_dir: Path, results: dict[str, list], run) -> list[str]:
    from puyu.launcher.chain import nested

    return ["## Corpus (data stage)", "", nested((run_dir / layout.SUMMARY / "summary.md").read_text())]


def register(registry: Registry) -> None:
    registry.add_job("data", JobSpec(DataJob, stages="puyu.data_pipeline.kinds:data_stages",
                                     report="puyu.data_pipeline.kinds:data_report"))
    registry.add_chain_step(ChainStep(
        "data", order=10, stages="puyu.data_pipeline.kinds:chain_stages", report="puyu.data_pipeline.kinds:chain_report",
        fields=(("data", DataJobConfig, DataJobConfig),),
        outputs={"corpus": f"{layout.SUMMARY}/corpus",  # Megatron .bin/.idx prefix
                 "tokenizer": f"{layout.TOKENIZER}/tokenizer.json",
                 "documents": f"{layout.DEDUP}/out"}))  # the deduplicated documents (jsonl.zst parts)
