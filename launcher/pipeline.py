"""Run a list of stages as one pipeline: each stage after the previous one succeeded.

On Slurm every stage is submitted at once, each with ``--dependency=afterok:<previous jobs>``
(and ``--kill-on-invalid-dep``), so the chain goes on without the login node; the launcher then
waits (unless ``launcher.wait=false``), stops at the first failed task, names it with its log, and
cancels what is left. Locally (real subprocesses) and inline (this process) stages run one after
another. Only ranks without a completion marker are submitted, so rerunning a run resumes it; a
rerun with other stage settings is refused (or, with ``launcher.overwrite=true``, redone from the
first changed stage), and a second launcher on a run whose first one is still live stops
(:mod:`puyu.launcher.runguard`). Every submission is recorded in ``<run>/launch.json`` for ``puyu job=status``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import submitit

from puyu.launcher import slurm
from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.errors import PuyuError, StageFailed
from puyu.launcher.executor import make_executor, sbatch_script, stage_cluster
from puyu.launcher.runguard import RunLock, check_fingerprints
from puyu.launcher.stage import Stage
from puyu.launcher.task import StageTask

log = logging.getLogger("puyu.launcher")
MANIFEST = "launch.json"


@dataclasses.dataclass
class Submitted:
    stage: Stage
    cluster: ClusterConfig
    ranks: list[int]
    jobs: list[submitit.Job]

    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]


def _record(run_dir: Path, sub: Submitted) -> None:
    path = run_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"submissions": []}
    manifest["submissions"].append({
        "stage": sub.stage.name, "shards": sub.stage.shards, "ranks": sub.ranks, "job_ids": sub.job_ids(),
        "cluster": sub.cluster.kind.value, "log_dir": str(run_dir / sub.stage.name / "logs"),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def _failure_detail(exc: BaseException) -> str:
    """The last meaningful line of a task's error (the exception line of its traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "state:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else type(exc).__name__


def _check_done(sub: Submitted) -> None:
    """Raise StageFailed for the first task of a finished stage that did not succeed."""
    for rank, job in zip(sub.ranks, sub.jobs):
        exc = job.exception()
        if exc is not None:
            state = job.state if sub.cluster.kind is ClusterKind.slurm else "FAILED"
            raise StageFailed(sub.stage.name, f"{job.job_id} (shard {rank})", state,
                              str(job.paths.stderr), _failure_detail(exc))


class Pipeline:
    def __init__(self, stages: list[Stage], run_dir: Path, cluster: ClusterConfig, launcher: LauncherConfig,
                 config_yaml: Optional[str] = None):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise PuyuError(f"stage names must be unique, got {names}")
        self.stages, self.run_dir, self.cluster, self.launcher = stages, Path(run_dir), cluster, launcher
        self.submitted: list[Submitted] = []
        self.lock = RunLock(self.run_dir)
        self.config_yaml = config_yaml  # written to <run>/config.yaml once the rerun checks pass

    # ------------------------------------------------------------------ entry
    def run(self) -> Optional[dict[str, list[Any]]]:
        """Run (or resume) the pipeline; returns stage -> per-shard results, or None if not waited for."""
        if self.launcher.dry_run:
            self._dry_run()
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        queued = False  # submitted and not waited for: the lock stays, holding the job ids
        try:
            check_fingerprints(self.stages, self.run_dir, self.launcher.overwrite)
            if self.config_yaml is not None:  # a refused rerun leaves the earlier run's config as it was
                atomic_write_text(self.run_dir / "config.yaml", self.config_yaml)
            if self.cluster.kind is ClusterKind.inline:
                self._run_inline()
            elif self.cluster.kind is ClusterKind.local:
                self._run_local()
            else:
                self._run_slurm()
                queued = not self.launcher.wait
                if queued:
                    return None
        except BaseException:
            self.cancel_pending()
            raise
        finally:
            if not queued:
                self.lock.release()
        return self.results()

    def results(self) -> dict[str, list[Any]]:
        return {s.name: [c.done_result() for c in s.contexts(self.run_dir)] for s in self.stages}

    def cancel_pending(self) -> None:
        """Cancel every job of this pipeline that has not finished (Ctrl-C, failure)."""
        jobs = [j for sub in self.submitted for j in sub.jobs]
        if self.cluster.kind is ClusterKind.slurm:
            # no state query first (submitit's done() may run sacct, slow on a busy controller, while the
            # user waits on Ctrl-C): scancel passes over the jobs that already ended
            if jobs:
                log.warning("cancelling this run's %d job(s) still queued or running", len(jobs))
                slurm.scancel([j.job_id for j in jobs])
            return
        live = [j for j in jobs if not j.done()]
        if live:
            log.warning("cancelling %d unfinished job(s): %s", len(live), " ".join(j.job_id for j in live))
        for j in live:
            j.cancel(check=False)

    # ------------------------------------------------------------------ modes
    def _stage_cluster(self, stage: Stage) -> ClusterConfig:
        return stage_cluster(self.cluster, stage.cluster, stage.name)

    def _dry_run(self) -> None:
        dependency = None
        for i, stage in enumerate(self.stages):
            c = self._stage_cluster(stage)
            if c.kind is ClusterKind.inline:
                print(f"# stage {stage.name}: {stage.shards} shard(s) run inline in this process")
                continue
            if i and c.kind is ClusterKind.slurm:
                dependency = f"afterok:<job id of stage {self.stages[i - 1].name!r}>"
            print(f"# ---- stage {stage.name} ({stage.shards} shard(s), cluster={c.kind.value})")
            if c.kind is ClusterKind.slurm:
                print(sbatch_script(c, self.run_dir / stage.name / "logs", stage.name, stage.shards, dependency))
            else:
                print(f"# local subprocesses: {c.tasks_per_node} task(s) each, timeout {c.time_min} min")
        print(f"# dry run: nothing submitted (run directory {self.run_dir})")

    def _run_inline(self) -> None:
        for stage in self.stages:
            task = StageTask(stage.name, stage.fn, str(self.run_dir), stage.shards)
            for rank in stage.pending_ranks(self.run_dir):
                try:
                    task(rank)
                except Exception as exc:
                    detail = traceback.format_exception_only(exc)[-1].strip()
                    raise StageFailed(stage.name, f"inline (shard {rank})", "FAILED", "this process's output",
                                      detail) from exc

    def _submit(self, stage: Stage, ranks: list[int], dependency: Optional[str] = None) -> Submitted:
        c = self._stage_cluster(stage)
        task = StageTask(stage.name, stage.fn, str(self.run_dir), stage.shards)
        if len(ranks) == 1:
            jobs = [make_executor(c, self.run_dir / stage.name / "logs", stage.name, dependency).submit(task, ranks[0])]
        else:  # Slurm refuses an array of more than MaxArraySize tasks: submit it as several arrays
            size = slurm.max_array_size() if c.kind is ClusterKind.slurm else len(ranks)
            jobs = self._arrays(stage, task, c, [ranks[i:i + size] for i in range(0, len(ranks), size)], dependency)
        sub = Submitted(stage, c, ranks, jobs)
        self.submitted.append(sub)
        _record(self.run_dir, sub)
        log.info("stage %s: submitted %d task(s) %s (logs: %s)", stage.name, len(jobs),
                 ",".join(sub.job_ids()[:4]) + ("…" if len(jobs) > 4 else ""), self.run_dir / stage.name / "logs")
        return sub

    def _arrays(self, stage: Stage, task: StageTask, c: ClusterConfig, chunks: list[list[int]],
                dependency: Optional[str]) -> list:
        """One array job per chunk, holding the stage's ``array_parallelism`` (p) together: Slurm throttles
        each array on its own, so n <= p arrays get shares of p that sum to p; with n > p each runs one
        task at a time and array j starts once array j - p has ended (afterany)."""
        n, p = len(chunks), max(1, c.array_parallelism)
        jobs, roots = [], []
        for j, chunk in enumerate(chunks):
            share = p // n + (j < p % n) if n <= p else 1
            after = [dependency] if dependency else []
            if n > p and j >= p:
                after.append(f"afterany:{roots[j - p]}")
            ex = make_executor(dataclasses.replace(c, array_parallelism=share), self.run_dir / stage.name / "logs",
                               stage.name, ",".join(after) or None)
            array = ex.map_array(task, chunk)
            roots.append(array[0].job_id.split("_")[0])
            jobs += array
        return jobs

    def _alive(self, sub: Submitted) -> bool:
        """Whether any job of the stage still runs or will run again.

        submitit calls a job done once a result file exists, but a task of a multi-process job that
        failed while its job was being requeued (its peer killed first) leaves one behind; Slurm's
        own state decides whether the job is really over.
        """
        if not all(j.done() for j in sub.jobs):
            return True
        if sub.cluster.kind is not ClusterKind.slurm:
            return False
        states = slurm.sacct_states(sub.job_ids())
        return any(states.get(j) in slurm.ALIVE_STATES for j in sub.job_ids())

    def _wait(self, sub: Submitted, last: bool = True) -> None:
        while self._alive(sub):
            time.sleep(self.launcher.poll_s)
        _check_done(sub)
        missing = sorted(set(sub.ranks) & set(sub.stage.pending_ranks(self.run_dir)))
        if missing:
            raise PuyuError(f"stage {sub.stage.name!r}: shards {missing} finished without a completion marker")
        if sub.cluster.kind is ClusterKind.slurm and not last:
            self._check_slurm_completed(sub)
        log.info("stage %s: shard(s) %s complete", sub.stage.name, ",".join(map(str, sub.ranks)))

    def _check_slurm_completed(self, sub: Submitted) -> None:
        """A task whose outputs are whole can still end CANCELLED in Slurm (cancelled while it wrote its
        last file): Slurm then cancels every stage that depends on it with ``afterok``. Say so here,
        naming that task, rather than later naming the dependent stage as if it had failed."""
        states = slurm.sacct_states(sub.job_ids())
        for rank, job in zip(sub.ranks, sub.jobs):
            state = states.get(job.job_id, "UNKNOWN")
            if state not in ("COMPLETED", "UNKNOWN"):
                raise StageFailed(sub.stage.name, f"{job.job_id} (shard {rank})", state, str(job.paths.stderr),
                                  "its outputs are complete, but Slurm cancels the stages that depend on it; "
                                  "rerun the same run= to go on from the next stage")

    def _run_local(self) -> None:
        for stage in self.stages:
            pending = stage.pending_ranks(self.run_dir)
            throttle = max(1, self._stage_cluster(stage).array_parallelism)
            for start in range(0, len(pending), throttle):
                self._wait(self._submit(stage, pending[start:start + throttle]))

    def _run_slurm(self) -> None:
        for c in {self._stage_cluster(s).partition for s in self.stages}:
            slurm.check_partition(c)
        dependency: Optional[str] = None
        chain: list[Submitted] = []
        for stage in self.stages:
            pending = stage.pending_ranks(self.run_dir)
            if not pending:
                log.info("stage %s: all %d shard(s) already complete", stage.name, stage.shards)
                continue
            sub = self._submit(stage, pending, dependency)
            chain.append(sub)
            roots = sorted({j.split("_")[0] for j in sub.job_ids()})
            dependency = "afterok:" + ":".join(roots)
        self.lock.record_jobs([j for sub in chain for j in sub.job_ids()])
        if not self.launcher.wait:
            print(f"submitted {len(chain)} stage(s); follow with: puyu job=status run={self.run_dir}")
            return
        for i, sub in enumerate(chain):
            self._wait(sub, last=i == len(chain) - 1)
