"""``puyu job=eval``: which models on which datasets, how tasks are cut, and how predictions are made.

Plain dataclasses with OmegaConf-friendly fields (stored in Hydra's ConfigStore), so a misspelt key fails
when the command line is composed. Importing this module must stay cheap (no torch): the ``puyu`` command
imports every job's config to register it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from puyu.launcher.config import JobConfig
from puyu.serving.config import RuntimeConfig


@dataclasses.dataclass
class InferenceConfig:
    """How predictions are made (part of every task's cache key, so changing it recomputes)."""

    circular: str = "circular"  # none | circular (cyclic shifts) | all_possible (all permutations): mc only
    num_fewshot: int = -1  # -1: each dataset's default
    max_tokens: int = 256  # generation datasets
    code_timeout_s: float = 10.0  # HumanEval: per program, in the sandbox
    num_samples: int = 1  # HumanEval: completions per problem (n of pass@k; k = 1, 10, 100 up to n)
    temperature: float = 0.0  # HumanEval sampling (0: greedy; must be > 0 when num_samples > 1)
    top_p: float = 0.95  # HumanEval sampling, as the Codex paper
    sample_seed: int = 0  # sample s of every problem is drawn with seed sample_seed + s


@dataclasses.dataclass
class EvalJobConfig(JobConfig):
    """``puyu job=eval job.models=[a,b] job.datasets=[mmlu,gsm8k,humaneval] cluster=slurm``.

    A model is a name in ``model_paths``, ``name:/path/to/engine`` or an engine directory (a
    ``job=build_engine`` output); with
    ``models`` empty every entry of ``model_paths`` is evaluated. Datasets are built-in names or keys of
    ``custom_datasets`` (``{path: rows.jsonl, kind: mc|gen}``). ``reuse`` names an earlier eval run: its
    finished tasks with the same key (model checksum, dataset items, inference settings) are copied, not
    recomputed, so a rerun after a failure only redoes what failed. ``judges`` maps a generation dataset to
    an LLM judge of its answers (``{engine: <engine dir> | base_url: <OpenAI-compatible URL>, model, prompt,
    max_tokens}``, see :mod:`puyu.evaluation.judge`), which adds ``judge_accuracy`` to its scores.
    """

    models: list[str] = dataclasses.field(default_factory=list)
    model_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["mmlu", "gsm8k", "humaneval"])
    custom_datasets: dict[str, Any] = dataclasses.field(default_factory=dict)
    limit: int = 0  # items per dataset (deterministic subset); 0 = all
    limits: dict[str, int] = dataclasses.field(default_factory=dict)  # per-dataset override of limit
    max_task_cost: float = 400_000.0  # size partitioner: estimated tokens a task may process
    reuse: str = ""  # an earlier eval run directory whose finished tasks are copied
    judges: dict[str, Any] = dataclasses.field(default_factory=dict)  # gen dataset -> LLM judge (judge.JudgeSpec)
    infer: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=lambda: RuntimeConfig(kv_cache_mb=512))
