"""``job=eval``: the stages the launcher submits.

- ``eval`` (an array, one task per :class:`TaskSpec` of the plan): loads the task's engine and dataset,
  predicts its item range (then, for a dataset in ``job.judges``, has the judge grade the answers) and writes ``eval/predictions/<model>/<dataset>/<key>.jsonl`` and then
  ``<key>.meta.json`` (engine checksum, counts, time), both atomically; the launcher's completion marker
  follows. With ``job.reuse=<earlier run>`` a task whose key and engine checksum match a finished task
  there copies that task's files instead of predicting (no engine is loaded).
- ``eval_summary`` (one task): scores every (model, dataset) from the cached predictions and writes the
  report (Markdown, CSV, HTML) and per-item details (see :mod:`puyu.evaluation.summarize`).

A rerun of the same ``run=`` submits only tasks without a completion marker; a failed task is named with
its log by the launcher, which cancels what is left.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

from puyu.evaluation.config import EvalJobConfig
from puyu.evaluation.items import EvalError
from puyu.evaluation.partition import ModelSpec, TaskSpec, plan_tasks, resolve_models
from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.stage import Stage, TaskContext


def dataset_limit(cfg: EvalJobConfig, name: str) -> int:
    return cfg.limits.get(name, cfg.limit)


def load_datasets(cfg: EvalJobConfig) -> dict:
    from puyu.evaluation.datasets import load_dataset

    unknown_limits = sorted(set(cfg.limits) - set(cfg.datasets))
    if unknown_limits:
        raise EvalError(f"job.limits names dataset(s) {unknown_limits} that are not in job.datasets {cfg.datasets}")
    return {name: load_dataset(name, limit=dataset_limit(cfg, name), custom=cfg.custom_datasets)
            for name in cfg.datasets}


def engine_checksum(engine_dir: Path) -> str:
    """What names the weights behind cached predictions (``serving.engine.weights_fingerprint``)."""
    from puyu.serving.engine import weights_fingerprint

    if not Path(engine_dir).is_dir():
        raise EvalError(f"model {engine_dir}: not a directory")
    return weights_fingerprint(engine_dir)


def meta_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.name.removesuffix(".jsonl") + ".meta.json")


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


@dataclasses.dataclass
class EvalTask:
    """One array task: predictions for one model on one item range of one dataset."""

    cfg: EvalJobConfig
    plan: list[TaskSpec]

    def __call__(self, ctx: TaskContext) -> dict:
        spec = self.plan[ctx.rank]
        out = spec.predictions(ctx.run_dir)
        engine = spec.model.resolve(ctx.run_dir)
        checksum = engine_checksum(engine)
        head = {"model": spec.model.name, "dataset": spec.dataset, "key": spec.key, "items": spec.stop - spec.start}
        if self.cfg.reuse and self._copy_from(Path(self.cfg.reuse), spec, out, checksum):
            print(f"eval task {ctx.rank}: {spec.model.name} on {spec.dataset} [{spec.start}, {spec.stop}) "
                  f"reused from {self.cfg.reuse}", flush=True)
            return {**head, "reused": True, **json.loads(meta_path(out).read_text())}
        from puyu.evaluation.datasets import load_dataset
        from puyu.evaluation.inferencers import predict
        from puyu.serving import LLM

        print(f"eval task {ctx.rank}/{ctx.world_size}: {spec.model.name} on {spec.dataset} "
              f"items [{spec.start}, {spec.stop}) (cost {spec.cost:.0f})", flush=True)
        dataset = load_dataset(spec.dataset, limit=dataset_limit(self.cfg, spec.dataset),
                               custom=self.cfg.custom_datasets)
        items = dataset.items[spec.start:spec.stop]
        t0 = time.perf_counter()
        llm = LLM(engine, runtime=self.cfg.runtime)
        records = predict(dataset, items, llm, self.cfg.infer)
        if spec.dataset in self.cfg.judges:
            from puyu.evaluation.judge import judge_records, judge_spec

            del llm  # an engine judge is loaded next: one model in memory at a time
            records = judge_records(judge_spec(spec.dataset, self.cfg.judges[spec.dataset]), items, records,
                                    self.cfg.runtime)
        seconds = time.perf_counter() - t0
        with atomic_open(out, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        meta = {"engine_sha256": checksum, "records": len(records), "seconds": round(seconds, 3)}
        atomic_write_text(meta_path(out), json.dumps(meta, sort_keys=True) + "\n")
        return {**head, "reused": False, **meta}

    @staticmethod
    def _copy_from(reuse_run: Path, spec: TaskSpec, out: Path, checksum: str) -> bool:
        """Copy the earlier run's finished predictions for this key if they were made with these weights."""
        old = spec.predictions(reuse_run)
        old_meta = meta_path(old)
        if not (old.is_file() and old_meta.is_file()):
            return False
        if json.loads(old_meta.read_text()).get("engine_sha256") != checksum:
            return False
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "wb") as fh:
            fh.write(old.read_bytes())
        atomic_write_text(meta_path(out), old_meta.read_text())
        return True


@dataclasses.dataclass
class EvalSummaryTask:
    cfg: EvalJobConfig
    plan: list[TaskSpec]
    models: list[ModelSpec]

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.evaluation.summarize import write_report

        return write_report(self.cfg, self.plan, self.models, ctx.run_dir, ctx.stage_dir)


def eval_stages(cfg: EvalJobConfig, in_run_models: Optional[dict[str, str]] = None) -> list[Stage]:
    """The plan (datasets are read here, on the submitting node, to size the tasks) as two stages."""
    cfg.runtime.validate()  # e.g. runtime.device=cuda without CUDA: refused before anything is submitted
    if cfg.reuse and not Path(cfg.reuse).is_dir():
        raise EvalError(f"job.reuse: {cfg.reuse} is not a directory (name an earlier eval run)")
    models = resolve_models(cfg, in_run_models)
    datasets = load_datasets(cfg)
    from puyu.evaluation.judge import check_judges

    check_judges(cfg.judges, datasets)
    from puyu.evaluation.inferencers import estimate_cost

    plan = plan_tasks(models, datasets, cfg, estimate_cost)
    return [Stage("eval", EvalTask(cfg, plan), shards=len(plan)),
            Stage("eval_summary", EvalSummaryTask(cfg, plan, models))]


def eval_report(cfg: EvalJobConfig, run_dir: Path, results: dict[str, list]) -> Path:
    return Path(results["eval_summary"][0]["report"])
