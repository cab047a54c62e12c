"""Job kinds and the main chain's steps, declared by the packages that implement them.

The launcher is the generic engine (configs → stages → submitit jobs); it knows no stage package. Each
package declares what it adds in a ``register(registry)`` function named in the ``puyu.jobs``
entry-point group of its distribution (setup.py's ``entry_points``), so a package outside puyu adds a
job kind the same way::

    entry_points={"puyu.jobs": ["mypkg = mypkg.puyu_jobs:register"]}

    def register(registry):
        registry.add_job("dedup_v2", JobSpec(MyJobConfig, stages="mypkg.jobs:build_stages"))

A job kind is a config dataclass plus either a stage builder (``cfg -> list[Stage]``, submitted as a
pipeline) or an action run on the login node (``status``); builders are named by import path, so the
CLI imports a stage's heavy dependencies only when that job runs. A chain step (:class:`ChainStep`) is a
package's part of ``job=pipeline``: the config sections it adds, the stages it appends, what it leaves
in the run directory for later steps (by name, see :class:`puyu.launcher.chain.RunOutputs`) and its
section of the report.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

from puyu.launcher.errors import PuyuError

ENTRY_POINT_GROUP = "puyu.jobs"


def load(path: str) -> Callable[..., Any]:
    """``"module:function"`` -> the function (imported now, not when the registry is read)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    config_cls: type
    stages: Optional[str] = None  # "module:function" -> function(job_cfg) -> list[Stage]
    action: Optional[str] = None  # "module:function" -> function(full_cfg) -> int (exit code), runs here
    report: Optional[str] = None  # "module:function" -> function(job_cfg, run_dir, results) -> report path

    def load(self, attr: str) -> Callable[..., Any]:
        return load(getattr(self, attr))


@dataclasses.dataclass(frozen=True)
class ChainStep:
    """One package's part of the main chain.

    ``fields``: the sections it adds to ``job=pipeline``'s config, ``(key, type, default factory)``.
    ``stages``: ``"module:function"`` -> ``function(cfg, run: RunOutputs) -> list[Stage]``; ``cfg`` is the
    whole pipeline config (a step may read another step's section by key), ``run`` names the outputs
    of the steps before it. ``outputs``: name -> path inside the run directory that this step leaves.
    ``report``: ``"module:function"`` -> ``function(cfg, run_dir, results, run: RunOutputs) -> [markdown lines]``.
    ``curves``: ``report.html`` loss curves, ``{section heading: (metrics.jsonl path in the run, label)}``.
    """

    name: str
    order: int  # place in the chain (data 10, pretrain 20, ...)
    stages: str
    fields: tuple[tuple[str, Any, Callable[[], Any]], ...] = ()
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    report: Optional[str] = None
    curves: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


class Registry:
    def __init__(self) -> None:
        self.jobs: dict[str, JobSpec] = {}
        self.chain: list[ChainStep] = []
        self._source = "?"  # the entry point registering now, for the duplicate messages

    def add_job(self, kind: str, spec: JobSpec) -> None:
        if kind in self.jobs:
            raise PuyuError(f"job kind {kind!r} is registered twice (again by entry point {self._source!r} "
                            f"of group {ENTRY_POINT_GROUP})")
        self.jobs[kind] = spec

    def add_chain_step(self, step: ChainStep) -> None:
        if any(s.name == step.name for s in self.chain):
            raise PuyuError(f"chain step {step.name!r} is registered twice (again by {self._source!r})")
        self.chain.append(step)
        self.chain.sort(key=lambda s: (s.order, s.name))


@functools.cache
def registry() -> Registry:
    """Every installed package's job kinds and chain steps, then the main chain's job (``pipeline``)."""
    reg = Registry()
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if not found:
        raise PuyuError(f"no {ENTRY_POINT_GROUP} entry points are installed: reinstall puyu (pip install -e .)")
    for ep in found:
        reg._source = ep.name
        ep.load()(reg)
    from puyu.launcher.chain import pipeline_job_spec  # assembled from the chain steps just registered

    reg._source = "puyu.launcher.chain"
    reg.add_job("pipeline", pipeline_job_spec(reg.chain))
    return reg


def job_kinds() -> dict[str, JobSpec]:
    return registry().jobs
