"""What the training package adds to ``puyu``: ``pretrain`` and ``finetune`` job kinds and their chain steps.

Registered through the ``puyu.jobs`` entry point (see :mod:`puyu.launcher.registry`).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from puyu.launcher.registry import ChainStep, JobSpec, Registry
from puyu.launcher.stage import Stage, TaskContext
from puyu.parallel.config import PretrainJobConfig
from puyu.parallel.ft_config import FinetuneJobConfig, SFTDataConfig


def _pretrain_section() -> PretrainJobConfig:
    return PretrainJobConfig(kind="pretrain")


def _finetune_section() -> FinetuneJobConfig:
    # chat conversations made from the Wikipedia leads; model and vocabulary follow pretrain.model
    return FinetuneJobConfig(kind="finetune", data=SFTDataConfig(wiki=2000, wiki_heldout=32))


def pretrain_chain_stages(cfg: Any, run) -> list[Stage]:
    from puyu.parallel.pretrain import pretrain_stages

    return pretrain_stages(cfg.pretrain, corpus_in_run=run.rel("corpus", "pretrain"), cluster=cfg.pretrain_cluster)


def pretrain_chain_report(cfg: Any, run_dir: Path, results: dict[str, list], run) -> list[str]:
    from puyu.parallel.pretrain import pretrain_report

    return ["## Pretraining", "", pretrain_report(run_dir, results["pretrain"][0])]


@dataclasses.dataclass
class WithConversations:
    """The ``sft_data`` task with chat files that earlier steps left in the run added to its data."""

    task: Any  # puyu.parallel.finetune.SFTDataTask
    in_run: list[str]  # paths relative to the run directory

    def __call__(self, ctx: TaskContext) -> Any:
        task = copy.deepcopy(self.task)
        task.cfg.data.paths = [*task.cfg.data.paths, *(str(ctx.run_dir / rel) for rel in self.in_run)]
        return task(ctx)


def finetune_chain_stages(cfg: Any, run) -> list[Stage]:
    """``sft_data`` + ``finetune`` of the newest ``model`` with the run's ``tokenizer``, on the configured
    conversations and every ``sft_conversations`` file an earlier step produced (e.g. agent traces)."""
    from puyu.parallel.finetune import finetune_stages

    finetune = dataclasses.replace(cfg.finetune, model=cfg.pretrain.model)  # the checkpoint's shapes
    sft_data, train = finetune_stages(finetune, in_run={"checkpoint": run.rel("model", "finetune"),
                                                        "tokenizer": run.rel("tokenizer", "finetune")},
                                      cluster=cfg.finetune_cluster)
    extra = run.all("sft_conversations")
    if extra:
        sft_data = dataclasses.replace(sft_data, fn=WithConversations(sft_data.fn, extra))
    return [sft_data, train]


def finetune_chain_report(cfg: Any, run_dir: Path, results: dict[str, list], run) -> list[str]:
    from puyu.parallel.finetune import finetune_report

    return ["## Finetuning", "", finetune_report(run_dir, results["finetune"][0])]


def register(registry: Registry) -> None:
    registry.add_job("pretrain", JobSpec(PretrainJobConfig, stages="puyu.parallel.pretrain:pretrain_stages",
                                         report="puyu.parallel.pretrain:write_report"))
    registry.add_job("finetune", JobSpec(FinetuneJobConfig, stages="puyu.parallel.finetune:finetune_stages",
                                         report="puyu.parallel.finetune:write_report"))
    registry.add_chain_step(ChainStep(
        "pretrain", order=20, stages="puyu.parallel.kinds:pretrain_chain_stages",
        report="puyu.parallel.kinds:pretrain_chain_report",
        fields=(("pretrain", PretrainJobConfig, _pretrain_section),
                ("pretrain_cluster", dict[str, Any], dict)),  # e.g. {tasks_per_node: 2}
        outputs={"model": "pretrain/model"},
        curves={"Pretraining": ("pretrain/metrics.jsonl", "pretraining loss")}))
    registry.add_chain_step(ChainStep(
        "finetune", order=40, stages="puyu.parallel.kinds:finetune_chain_stages",
        report="puyu.parallel.kinds:finetune_chain_report",
        fields=(("finetune", FinetuneJobConfig, _finetune_section),
                ("finetune_cluster", dict[str, Any], dict)),
        outputs={"model": "finetune/model"},
        curves={"Finetuning": ("finetune/metrics.jsonl", "finetuning loss")}))
