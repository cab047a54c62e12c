"""What keeps a rerun of a run directory from mixing outputs: a launcher lock and stage fingerprints.

Completion markers make a rerun skip finished shards, which is only right if the rerun asks for the
same thing. So every launch records each stage's fingerprint (its shard count, the config its
outputs depend on, the stage before it) in ``<run>/stages.json``; a rerun whose fingerprint differs
for a stage that ran before is refused in one line naming what changed, or, with
``launcher.overwrite=true``, that stage's folder and every later stage's are cleared (their outputs were
made from the old ones) and the run starts over from there. This holds for every job kind: a stage
that gives no ``config`` is fingerprinted by its shard count and place alone, which is still the
difference that would mix shards of two layouts.

The lock (``<run>/launcher.lock``, JSON: host, pid, start time and, on Slurm, the job ids it
submitted) is created atomically (a complete temp file hard-linked to the name, which fails if it
exists), so of two launchers on one run the second stops instead of resubmitting shards the first
still has queued. A lock is stale, and taken over with a warning, when none of its Slurm jobs is
still queued or running and its launcher process is gone (checked with ``kill(pid, 0)`` on the same
host; from another host only once it had submitted jobs and they are all over). After
``launcher.wait=false`` on Slurm the lock stays behind with its job ids, so it holds while they are queued.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from puyu.launcher import slurm
from puyu.launcher.atomic import FILE_MODE, atomic_write_text
from puyu.launcher.errors import PuyuError
from puyu.launcher.stage import Stage

log = logging.getLogger("puyu.launcher")
LOCK = "launcher.lock"
FINGERPRINTS = "stages.json"


# ---------------------------------------------------------------------------- fingerprints
def fingerprint(stage: Stage, previous: Optional[str]) -> dict[str, Any]:
    """JSON-normal (what reading the record back gives) so a comparison sees only real changes."""
    return json.loads(json.dumps({"shards": stage.shards, "after": previous, "config": stage.config},
                                 default=str, sort_keys=True))


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs (``config.`` dropped from the names)."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            name = key.removeprefix("config.")
            out.append(f"{'stage before' if name == 'after' else name}: {a.get(key, '(absent)')!r} -> "
                       f"{b.get(key, '(absent)')!r}")
    return out


def check_fingerprints(stages: list[Stage], run_dir: Path, overwrite: bool) -> None:
    """Refuse (or, with overwrite, clear and redo from) the first stage whose recorded fingerprint differs."""
    path = run_dir / FINGERPRINTS
    try:
        recorded = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise PuyuError(f"{path}: unreadable stage record ({exc}); remove it only if the run's outputs "
                        f"match this config") from exc
    current = {s.name: fingerprint(s, stages[i - 1].name if i else None) for i, s in enumerate(stages)}
    changed = next((i for i, s in enumerate(stages) if s.name in recorded and recorded[s.name] != current[s.name]),
                   None)
    if changed is not None:
        name = stages[changed].name
        diff = changes(recorded[name], current[name])
        more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
        if not overwrite:
            raise PuyuError(f"run {run_dir}: stage {name!r} ran with different settings ({'; '.join(diff[:2])}{more}); "
                            f"rerun with launcher.overwrite=true to clear it and the stages after it, or use a new run=")
        for stage in stages[changed:]:
            if (run_dir / stage.name).exists():
                log.warning("launcher.overwrite: clearing %s (%s)", run_dir / stage.name, "; ".join(diff[:2]) + more)
                shutil.rmtree(run_dir / stage.name)
            recorded.pop(stage.name, None)
    if any(recorded.get(name) != fp for name, fp in current.items()):  # a resume leaves the record untouched
        recorded.update(current)
        atomic_write_text(path, json.dumps(recorded, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """One launcher per run directory at a time (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_ids": []}

    def _link(self) -> bool:
        """Create the lock with its whole content at once; False if one exists."""
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), FILE_MODE)
                json.dump(self.info, fh)
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _stale(self, holder: dict[str, Any]) -> Optional[str]:
        """Why the lock ``holder`` wrote no longer holds, or None while it may."""
        jobs = [str(j) for j in holder.get("job_ids", [])]
        if jobs:
            states = slurm.sacct_states(jobs)
            if any(states.get(j) in slurm.ALIVE_STATES for j in jobs):
                return None
        if holder.get("host") == self.info["host"]:
            return None if _pid_alive(int(holder.get("pid", 0))) else f"pid {holder.get('pid')} is gone"
        return "its Slurm jobs are over" if jobs else None

    def acquire(self) -> None:
        for _ in range(3):
            if self._link():
                return
            try:
                holder = json.loads(self.path.read_text())
            except FileNotFoundError:  # released meanwhile
                continue
            except json.JSONDecodeError:
                holder = {}
            reason = self._stale(holder) if holder else "unreadable"
            if reason is None:
                jobs = holder.get("job_ids", [])
                what = f"its jobs {','.join(jobs[:4])}{'…' if len(jobs) > 4 else ''} are queued or running" if jobs \
                    else "it is running"
                raise PuyuError(f"run {self.path.parent} is locked by the launcher pid {holder.get('pid')} on "
                                f"{holder.get('host')} started {holder.get('started')} and {what}; wait for it "
                                f"(puyu job=status run={self.path.parent}) or, if it is gone, remove {self.path}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if json.loads(self.path.read_text() or "{}") == holder:  # not a lock another launcher took meanwhile
                    log.warning("taking over the stale lock %s (%s)", self.path, reason)
                    self.path.unlink()
        raise PuyuError(f"could not take {self.path}: other launchers keep creating it")

    def record_jobs(self, job_ids: list[str]) -> None:
        """Keep the submitted jobs in the lock, so it holds while they are queued after this process ends."""
        self.info["job_ids"] = list(job_ids)
        atomic_write_text(self.path, json.dumps(self.info))

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
                self.path.unlink()
