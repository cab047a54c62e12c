"""What the serving package adds to ``puyu``: ``build_engine`` and ``infer`` job kinds and their chain step.

Registered through the ``puyu.jobs`` entry point (see :mod:`puyu.launcher.registry`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from puyu.launcher.atomic import atomic_open
from puyu.launcher.registry import ChainStep, JobSpec, Registry
from puyu.launcher.stage import Stage, TaskContext
from puyu.serving.config import BuildEngineJobConfig, InferJobConfig

ENGINE = "build_engine/engine"


@dataclasses.dataclass
class PromptsFromCorpus:
    """``prompts/prompts.jsonl``: the opening words of the last documents of the run's corpus."""

    count: int
    words: int
    documents: str  # folder of document files, relative to the run directory

    def __call__(self, ctx: TaskContext) -> dict:
        from puyu.data_pipeline.writers import read_docs

        files = sorted((ctx.run_dir / self.documents).glob("*"))
        docs = [d for f in files for d in read_docs(f)][-self.count:]
        out = ctx.stage_dir / "prompts.jsonl"
        with atomic_open(out, "w", encoding="utf-8") as fh:
            for d in docs:
                prompt = " ".join(d.text.split()[: self.words])
                fh.write(json.dumps({"id": d.id, "prompt": prompt}, ensure_ascii=False) + "\n")
        return {"prompts": len(docs), "file": str(out)}


def chain_stages(cfg: Any, run) -> list[Stage]:
    """The engine from the newest ``model`` and the run's ``tokenizer``, then batch inference over prompts cut
    from the run's ``documents``."""
    from puyu.launcher.chain import InRun
    from puyu.serving.build import BuildEngineTask
    from puyu.serving.job import InferMergeTask, InferTask

    infer_paths = {"engine": ENGINE, "input": "prompts/prompts.jsonl"}
    build_paths = {"checkpoint": run.rel("model", "build_engine"), "tokenizer": run.rel("tokenizer", "build_engine"),
                   "out": ENGINE}
    return [Stage("build_engine", InRun(BuildEngineTask, cfg.engine, build_paths)),
            Stage("prompts", PromptsFromCorpus(cfg.prompts, cfg.prompt_words, run.rel("documents", "prompts"))),
            Stage("infer", InRun(InferTask, cfg.infer, infer_paths), shards=cfg.infer.shards),
            Stage("infer_merge", InRun(InferMergeTask, cfg.infer, infer_paths))]


def chain_report(cfg: Any, run_dir: Path, results: dict[str, list], run) -> list[str]:
    from puyu.launcher.chain import nested

    build = (run_dir / ENGINE / "build_report.md").read_text()
    tasks = results["infer"]
    tokens = sum(t["output_tokens"] for t in tasks)
    lines = ["## Serving", "", nested(build), "",
             f"### Batch inference: {sum(t['requests'] for t in tasks)} prompts, {len(tasks)} tasks, "
             f"{tokens} output tokens", "", "| task | requests | errors | output tokens | tokens/s |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {i} | {t['requests']} | {t['errors']} | {t['output_tokens']} | {t['tokens_per_s']:.0f} |"
              for i, t in enumerate(tasks)]
    outputs = run_dir / "infer" / "outputs.jsonl"
    prompts = (run_dir / "prompts" / "prompts.jsonl").read_text().splitlines()
    lines += ["", f"Outputs: `{outputs}`. The first three:", ""]
    for record in map(json.loads, outputs.read_text().splitlines()[:3]):
        prompt = json.loads(prompts[record["index"]])["prompt"]
        lines.append(f"- `{prompt}` → `{record.get('text', record.get('error', ''))}`")
    return lines


def register(registry: Registry) -> None:
    registry.add_job("build_engine", JobSpec(BuildEngineJobConfig, stages="puyu.serving.build:build_engine_stages"))
    registry.add_job("infer", JobSpec(InferJobConfig, stages="puyu.serving.job:build_infer_stages"))
    registry.add_chain_step(ChainStep(
        "serving", order=50, stages="puyu.serving.kinds:chain_stages", report="puyu.serving.kinds:chain_report",
        fields=(("engine", BuildEngineJobConfig, lambda: BuildEngineJobConfig(kind="build_engine")),
                ("prompts", int, lambda: 64),  # batch inference over the opening words of this many documents
                ("prompt_words", int, lambda: 12),
                ("infer", InferJobConfig, lambda: InferJobConfig(kind="infer"))),
        outputs={"engine": ENGINE}))
