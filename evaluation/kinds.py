"""What the evaluation package adds to ``puyu``: the ``eval`` job kind and its chain step.

Registered through the ``puyu.jobs`` entry point (see :mod:`puyu.launcher.registry`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from puyu.evaluation.config import EvalJobConfig
from puyu.launcher.registry import ChainStep, JobSpec, Registry
from puyu.launcher.stage import Stage

CHAIN_MODEL = "finetuned"  # the eval stage's name for the engine the chain builds


def chain_stages(cfg: Any, run) -> list[Stage]:
    """Benchmarks on the run's ``engine`` (named "finetuned"; job.eval.model_paths may add more models)."""
    from puyu.evaluation.job import eval_stages

    return eval_stages(cfg.eval, in_run_models={CHAIN_MODEL: run.rel("engine", "eval")})


def chain_report(cfg: Any, run_dir: Path, results: dict[str, list], run) -> list[str]:
    from puyu.launcher.chain import nested

    evaluation = Path(results["eval_summary"][0]["report"]).read_text()
    return ["## Evaluation", "", nested(evaluation), "", f"Report files: `{run_dir / 'eval_summary'}`"]


def register(registry: Registry) -> None:
    registry.add_job("eval", JobSpec(EvalJobConfig, stages="puyu.evaluation.job:eval_stages",
                                     report="puyu.evaluation.job:eval_report"))
    registry.add_chain_step(ChainStep(
        "eval", order=60, stages="puyu.evaluation.kinds:chain_stages", report="puyu.evaluation.kinds:chain_report",
        fields=(("eval", EvalJobConfig, lambda: EvalJobConfig(kind="eval")),)))
