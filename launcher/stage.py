"""Stages: the unit a pipeline submits, and the context each of its tasks runs in.

A stage is a picklable callable plus how it is spread: ``shards=N`` makes it an array of N tasks
(datatrove-style: each task handles ``rank`` of ``world_size`` and leaves ``completions/{rank:05d}``
when done, so a rerun of the same run skips it); ``cluster`` overrides the job's cluster options
for this stage alone (e.g. ``{"tasks_per_node": 4}`` for a torch.distributed stage); ``config`` is what
its outputs depend on, recorded so that a rerun with other settings is refused (:mod:`puyu.launcher.runguard`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.errors import ConfigError

COMPLETIONS = "completions"
PROGRESS = "progress"
PROGRESS_EVERY_S = 10.0  # a log line and a progress file at most this often per task

log = logging.getLogger("puyu.progress")


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """Where a task is and which share of the stage it owns.

    ``rank``/``world_size`` index the shard of a sharded stage (the array task); inside a
    multi-task (distributed) job use :func:`puyu.launcher.distributed.dist_env` for process ranks.
    """

    run_dir: Path
    stage_dir: Path
    rank: int = 0
    world_size: int = 1

    def marker(self) -> Path:
        return self.stage_dir / COMPLETIONS / f"{self.rank:05d}"

    def is_done(self) -> bool:
        return self.marker().exists()

    def mark_done(self, result: Any = None) -> None:
        """Write the completion marker last, atomically: its presence means the shard's outputs are whole."""
        payload = {"rank": self.rank, "world_size": self.world_size, "result": result}
        atomic_write_text(self.marker(), json.dumps(payload, default=str, sort_keys=True) + "\n")

    def done_result(self) -> Any:
        return json.loads(self.marker().read_text())["result"]

    def progress(self, unit: str, total: Optional[int] = None, done: int = 0) -> "Progress":
        """A counter for this task's long loop (``done``: items finished before a resume): log lines and
        ``job=status`` show how far it is."""
        return Progress(self, unit, total, done)


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


class Progress:
    """How far a task's loop is, told the way batch users read it: a log line (``tqdm``'s fields, one
    line each, no carriage returns in a Slurm log) and ``<stage>/progress/<rank>.json`` for
    ``puyu job=status``. Both at most every :data:`PROGRESS_EVERY_S` seconds, so ``update`` is cheap
    to call per item; ``close`` writes the final count."""

    def __init__(self, ctx: TaskContext, unit: str, total: Optional[int], done: int = 0) -> None:
        self.ctx, self.unit, self.total = ctx, unit, total
        self.n = self.resumed = done
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self._report()

    def close(self) -> None:
        self._report()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.resumed) / elapsed if elapsed > 0.1 else 0.0  # this run's, not the resumed part
        head = f"{self.ctx.stage_dir.name} shard {self.ctx.rank}/{self.ctx.world_size}: "
        head += f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        tail = f", {_si(rate)} {self.unit}/s" if rate else ""
        if rate and self.total and self.n < self.total:
            tail += f", eta {(self.total - self.n) / rate:.0f} s"
        return f"{head} [{elapsed:.0f} s{tail}]"

    def _report(self) -> None:
        self.last = time.monotonic()
        text = self.line()
        log.info(text)
        record = {"n": self.n, "total": self.total, "unit": self.unit, "line": text, "time": time.time()}
        atomic_write_text(self.ctx.stage_dir / PROGRESS / f"{self.ctx.rank:05d}.json", json.dumps(record) + "\n")


@dataclasses.dataclass
class Stage:
    """One step of a pipeline.

    ``fn(ctx: TaskContext)`` must be picklable (a module-level function or an object); what it
    returns is stored in the completion marker (keep it JSON-friendly: counts, paths). If ``fn``
    is a :class:`submitit.helpers.Checkpointable`, its ``checkpoint`` runs on preemption/timeout.
    """

    name: str
    fn: Callable[[TaskContext], Any]
    shards: int = 1
    cluster: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: Optional[dict[str, Any]] = None  # JSON-friendly settings its outputs depend on (None: shards only)

    def __post_init__(self) -> None:
        if not self.name or os.sep in self.name:
            raise ValueError(f"stage name {self.name!r} must be a plain, non-empty folder name")
        if self.shards < 1:
            # a config's shard count (job.shards, job.infer.shards, ...): the user's to fix
            raise ConfigError(f"stage {self.name!r}: shards must be >= 1, got {self.shards}")

    def contexts(self, run_dir: Path) -> list[TaskContext]:
        stage_dir = Path(run_dir) / self.name
        return [TaskContext(Path(run_dir), stage_dir, r, self.shards) for r in range(self.shards)]

    def pending_ranks(self, run_dir: Path) -> list[int]:
        """Ranks without a completion marker: what a rerun of this run still has to do."""
        return [c.rank for c in self.contexts(run_dir) if not c.is_done()]
