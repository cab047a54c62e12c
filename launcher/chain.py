"""The main job, ``puyu job=pipeline``: every registered chain step, in order, in one run directory.

The launcher assembles it and knows none of its parts: each stage package registers a
:class:`~puyu.launcher.registry.ChainStep` (see its ``kinds`` module) — data (read → filter → dedup →
tokenize) → pretrain → agent traces → sft_data → finetune → build_engine → prompts → infer → eval →
agents with the packages installed here. The job's config is made of the steps' sections; each step
appends its stages and names what it leaves in the run directory (``corpus``, ``tokenizer``,
``documents``, ``model``, ``engine``, ...), and later steps ask :class:`RunOutputs` for those names
instead of knowing another stage's folders. The paths exist only once the earlier stages ran, so
configs name paths *inside the run* and :class:`InRun` resolves them when the task starts.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.config import JobConfig
from puyu.launcher.errors import ConfigError
from puyu.launcher.registry import ChainStep, JobSpec, load, registry
from puyu.launcher.report_html import write_report_html
from puyu.launcher.stage import Stage, TaskContext


class RunOutputs:
    """What the steps so far leave in the run directory, by name (paths relative to the run).

    A name may be produced again by a later step (``model``: pretraining's, then finetuning's): ``rel``
    gives the newest, ``all`` every one in chain order."""

    def __init__(self) -> None:
        self._produced: list[tuple[str, str, str]] = []  # (name, path, step)

    def add(self, step: ChainStep) -> None:
        self._produced += [(name, rel, step.name) for name, rel in step.outputs.items()]

    def rel(self, name: str, asking: str = "") -> str:
        found = self.all(name)
        if not found:
            known = sorted({n for n, _, _ in self._produced})
            raise ConfigError(f"job=pipeline: step {asking or '?'} needs {name!r}, which no step before it produces "
                              f"(produced so far: {', '.join(known) or 'nothing'})")
        return found[-1]

    def all(self, name: str) -> list[str]:
        return [rel for n, rel, _ in self._produced if n == name]


@dataclasses.dataclass
class InRun:
    """A stage function built from ``cfg`` once the fields in ``paths`` point into this run."""

    task_cls: Any
    cfg: Any
    paths: dict[str, str]  # config field -> path relative to the run directory

    def __call__(self, ctx: TaskContext) -> Any:
        cfg = copy.deepcopy(self.cfg)
        for field, rel in self.paths.items():
            setattr(cfg, field, str(ctx.run_dir / rel))
        return self.task_cls(cfg)(ctx)


def nested(markdown: str) -> str:
    """A stage's own report as a part of report.md: its headings two levels down (# -> ###, ## -> ####)."""
    return re.sub(r"^(#{1,4}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", markdown, flags=re.M).strip()


def _config_class(steps: list[ChainStep]) -> type:
    fields = []
    for step in steps:
        for key, typ, default in step.fields:
            if any(key == f[0] for f in fields):
                raise ConfigError(f"job=pipeline: config section {key!r} is declared by two chain steps")
            fields.append((key, typ, dataclasses.field(default_factory=default)))
    cls = dataclasses.make_dataclass("PipelineJobConfig", fields, bases=(JobConfig,))
    cls.__module__ = __name__  # pickled by reference: the module's __getattr__ finds it
    cls.__doc__ = "The main job: the sections of every chain step (" + ", ".join(s.name for s in steps) + ")."
    return cls


def __getattr__(name: str) -> Any:
    """``PipelineJobConfig`` (made from the installed chain steps) by name, so configs pickle by reference."""
    if name == "PipelineJobConfig":
        return registry().jobs["pipeline"].config_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pipeline_job_spec(steps: list[ChainStep]) -> JobSpec:
    return JobSpec(_config_class(steps), stages="puyu.launcher.chain:pipeline_stages",
                   report="puyu.launcher.chain:pipeline_report")


def _outputs_before_each(steps: list[ChainStep]) -> list[tuple[ChainStep, RunOutputs]]:
    out, run = [], RunOutputs()
    for step in steps:
        out.append((step, copy.deepcopy(run)))
        run.add(step)
    return out


def pipeline_stages(cfg: Any) -> list[Stage]:
    stages: list[Stage] = []
    for step, run in _outputs_before_each(registry().chain):
        stages += load(step.stages)(cfg, run)
    return stages


def pipeline_report(cfg: Any, run_dir: Path, results: dict[str, list]) -> Path:
    """``report.md`` in the run directory: each step's section, with links; the same as one page,
    ``report.html``, with the steps' loss curves drawn."""
    lines = ["# puyu pipeline report", "", f"Run directory: `{run_dir}`", "", "| stage | shards |", "|---|---|"]
    lines += [f"| {stage} | {len(shard_results)} |" for stage, shard_results in results.items()]
    curves = {}
    for step, run in _outputs_before_each(registry().chain):
        run.add(step)  # a step's report may name its own outputs
        if step.report:
            lines += ["", *load(step.report)(cfg, run_dir, results, run)]
        curves.update({title: (run_dir / rel, label) for title, (rel, label) in step.curves.items()})
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_report_html("\n".join(lines), run_dir / "report.html", curves)
    return path
