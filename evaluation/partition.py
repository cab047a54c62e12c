"""The size partitioner: (model × dataset) work cut into tasks of bounded cost, each with a cache key.

Like OpenCompass's ``SizePartitioner``, a task never mixes models or datasets, and a dataset is split into
contiguous item ranges whose estimated cost (tokens to process, from the inferencer) stays under
``max_task_cost`` — a single item costlier than the bound gets a task of its own. The task key names the
range and hashes everything its predictions depend on except the weights (checked separately, by the
engine's manifest checksum, when a cached prediction is reused), so keys are known before engines exist.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from puyu.evaluation.config import EvalJobConfig
from puyu.evaluation.items import EvalError

MANIFEST = "manifest.json"  # the engine file whose checksum identifies the weights


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    in_run: bool = False  # path is relative to the run directory (an engine a pipeline stage builds)

    def resolve(self, run_dir: Path) -> Path:
        return Path(run_dir) / self.path if self.in_run else Path(self.path)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    model: ModelSpec
    dataset: str
    kind: str  # the dataset's kind (mc, gen, code, bpb): how its predictions are scored
    start: int  # item range [start, stop) of the dataset's (limited) item list
    stop: int
    cost: float
    key: str  # "<start>-<stop>-<hash>": file name of the task's predictions

    def predictions(self, run_dir: Path) -> Path:
        return Path(run_dir) / "eval" / "predictions" / self.model.name / self.dataset / f"{self.key}.jsonl"


def resolve_models(cfg: EvalJobConfig, in_run: dict[str, str] | None = None) -> list[ModelSpec]:
    """``cfg.models`` as named specs; ``in_run`` adds names whose engines a pipeline builds in the run.

    An entry is a name in ``model_paths``, ``name:/path/to/engine``, or an engine directory (named by the
    shortest tail of its path that tells it apart from the other entries).
    """
    in_run = dict(in_run or {})
    names = list(cfg.models) or list(cfg.model_paths) + list(in_run)
    if not names:
        raise EvalError("job.models is empty and job.model_paths names no model: nothing to evaluate")
    specs = []
    for entry in names:
        name, sep, path = entry.partition(":")
        if sep and name.isidentifier() and path:  # "name:/path/to/engine" names an engine on the command line
            specs.append(ModelSpec(name, str(Path(path).absolute())))
        elif entry in in_run:
            specs.append(ModelSpec(entry, in_run[entry], in_run=True))
        elif entry in cfg.model_paths:
            specs.append(ModelSpec(entry, str(Path(cfg.model_paths[entry]).absolute())))
        elif Path(entry).is_dir():
            specs.append(ModelSpec(_short_name(entry, names), str(Path(entry).absolute())))
        else:
            known = sorted(set(cfg.model_paths) | set(in_run))
            raise EvalError(f"job.models: unknown model {entry!r}: not a name in job.model_paths (known: "
                            f"{', '.join(known) or 'none'}) and not an engine or model directory")
    seen = [s.name for s in specs]
    if len(set(seen)) != len(seen):
        raise EvalError(f"job.models: model names must be unique, got {seen}")
    for spec in specs:
        path = Path(spec.path)
        if not spec.in_run and not ((path / MANIFEST).is_file() or (path / "config.json").is_file()):
            raise EvalError(f"job.models: model {spec.name!r} at {spec.path} is neither an engine directory "
                            f"(no {MANIFEST}; build one with `puyu job=build_engine`) nor a Hugging Face model "
                            "directory (no config.json)")
    return specs


def _short_name(path: str, entries: Sequence[str]) -> str:
    """The shortest trailing part of ``path`` that no other entry ends with (``a/engine`` vs ``b/engine``)."""
    parts = Path(path).absolute().parts
    others = [Path(e).absolute().parts for e in entries if e != path]
    for n in range(1, len(parts) + 1):
        if all(o[-n:] != parts[-n:] for o in others):
            return "_".join(parts[-n:])
    return "_".join(parts[1:])


def split_by_cost(costs: Sequence[float], max_cost: float) -> list[range]:
    """Contiguous ranges covering ``costs`` in order, each summing to at most ``max_cost`` (or one item)."""
    ranges, start, total = [], 0, 0.0
    for i, c in enumerate(costs):
        if i > start and total + c > max_cost:
            ranges.append(range(start, i))
            start, total = i, 0.0
        total += c
    if len(costs) > start:
        ranges.append(range(start, len(costs)))
    return ranges


def settings_hash(model: ModelSpec, dataset: str, item_ids: Sequence[str], cfg: EvalJobConfig) -> str:
    payload = {"model": model.path, "dataset": dataset, "items": list(item_ids),
               "infer": dataclasses.asdict(cfg.infer),
               "custom": cfg.custom_datasets.get(dataset) if dataset in cfg.custom_datasets else None}
    if dataset in cfg.judges:  # only then, so that runs without judges keep their keys
        payload["judge"] = dict(cfg.judges[dataset])
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def plan_tasks(models: list[ModelSpec], datasets: dict, cfg: EvalJobConfig, estimate_cost) -> list[TaskSpec]:
    """Every (model, dataset) pair cut into ranges; ``estimate_cost(dataset, item, infer_cfg) -> float``."""
    if cfg.max_task_cost <= 0:
        raise EvalError(f"job.max_task_cost must be > 0, got {cfg.max_task_cost}")
    tasks = []
    for model in models:
        for name, ds in datasets.items():
            costs = [estimate_cost(ds, item, cfg.infer) for item in ds.items]
            for r in split_by_cost(costs, cfg.max_task_cost):
                digest = settings_hash(model, name, [ds.items[i].id for i in r], cfg)
                tasks.append(TaskSpec(model, name, ds.kind, r.start, r.stop, sum(costs[i] for i in r),
                                      f"{r.start:05d}-{r.stop:05d}-{digest}"))
    return tasks
