"""Callables the launcher tests submit as jobs (shipped by value: see conftest.py)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.distributed import dist_env
from puyu.launcher.stage import TaskContext


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    """The first truthy value of ``predicate()``, polled until ``timeout_s``; fails naming ``what``."""
    end = time.time() + timeout_s
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def run_inline(stages, run_dir) -> dict:
    """Every pending task of every stage in this process, markers and all, as ``cluster=inline`` does."""
    from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
    from puyu.launcher.pipeline import Pipeline

    return Pipeline(stages, run_dir, ClusterConfig(kind=ClusterKind.inline), LauncherConfig()).run()


def echo(ctx: TaskContext) -> dict:
    """Return who ran: the shard and the torch.distributed-style process ranks."""
    env = dist_env()
    out = {"shard": ctx.rank, "shards": ctx.world_size, "rank": env.rank, "world_size": env.world_size,
           "master_addr": env.master_addr, "master_port": env.master_port, "host": socket.gethostname(),
           "node": os.environ.get("SLURMD_NODENAME", "")}
    atomic_write_text(ctx.stage_dir / "ranks" / f"{ctx.rank}-{env.rank}.json", json.dumps(out))
    return out


class Timed:
    """Sleep, and record when this shard started and ended (to check ordering and throttles)."""

    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def __call__(self, ctx: TaskContext) -> dict:
        start = time.time()
        time.sleep(self.sleep_s)
        out = {"start": start, "end": time.time()}
        atomic_write_text(ctx.stage_dir / "times" / f"{ctx.rank}.json", json.dumps(out))
        return out


class Announced:
    """Write ``started/<rank>`` as soon as the task body runs, then sleep (so a test can act mid-task)."""

    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def __call__(self, ctx: TaskContext) -> dict:
        atomic_write_text(ctx.stage_dir / "started" / str(ctx.rank), str(time.time()))
        time.sleep(self.sleep_s)
        return {"slept": self.sleep_s}


def fail(ctx: TaskContext) -> None:
    raise ValueError(f"boom in shard {ctx.rank}")


class StepCounter(Checkpointable):
    """A 'training loop': one step per ``step_s``, progress saved to disk after every step.

    Restarted by a requeue it resumes from the saved step; on the pre-timeout signal its
    ``checkpoint`` saves the in-memory step and asks to be requeued.
    """

    def __init__(self, steps: int, step_s: float):
        self.steps, self.step_s = steps, step_s
        self.step = 0
        self.ctx: TaskContext | None = None

    def _state_path(self, ctx: TaskContext) -> Path:
        return ctx.stage_dir / f"state-{ctx.rank}.json"

    def _load(self, ctx: TaskContext) -> dict:
        path = self._state_path(ctx)
        return json.loads(path.read_text()) if path.exists() else {"step": 0, "starts": [], "checkpoints": 0}

    def _save(self, ctx: TaskContext, state: dict) -> None:
        atomic_write_text(self._state_path(ctx), json.dumps(state))

    def __call__(self, ctx: TaskContext) -> dict:
        self.ctx = ctx
        state = self._load(ctx)
        self.step = state["step"]
        state["starts"].append({"step": self.step, "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))})
        self._save(ctx, state)
        while self.step < self.steps:
            time.sleep(self.step_s)
            self.step += 1
            state["step"] = self.step
            self._save(ctx, state)
        return self._load(ctx)

    def checkpoint(self, ctx: TaskContext) -> DelayedSubmission:
        state = self._load(ctx)
        state["step"] = self.step
        state["checkpoints"] += 1
        self._save(ctx, state)
        return DelayedSubmission(self, ctx)


def hanging_pretrain_task(cfg, hang_rank: int, hang_s: float):
    """A pretraining task whose rank ``hang_rank`` stalls in its second step (a hung GPU, say)."""
    from puyu.parallel.pretrain import PretrainTask

    class HangingPretrain(PretrainTask):
        def _forward_backward(self, stages, schedule, micro, dims, coords):
            self.steps_run = getattr(self, "steps_run", 0) + 1
            if self.steps_run == 2 and dist_env().rank == hang_rank:
                time.sleep(hang_s)
            return super()._forward_backward(stages, schedule, micro, dims, coords)

    return HangingPretrain(cfg)


def probing_pretrain_task(cfg):
    """A pretraining task that probes its first step and has rank 0 write ``<stage dir>/probe.json``: the
    dtypes its linears output and its master weights hold (hooks on every ``nn.Linear``), the peak
    bytes of activations autograd held for backward (distinct live storages, local shards of DTensors), the output
    head's placements, and the run's precision summary."""
    import torch
    from torch.distributed.tensor import DTensor

    from puyu.parallel.pretrain import PretrainTask

    class ProbingPretrain(PretrainTask):
        def _forward_backward(self, stages, schedule, micro, dims, coords):
            if hasattr(self, "probe"):
                return super()._forward_backward(stages, schedule, micro, dims, coords)
            outputs: set[str] = set()
            # bytes of the storages autograd holds for backward, counted while they are alive: keyed by
            # address among live storages only, so memory the allocator hands out again after backward
            # freed it (an address seen twice) is neither merged nor double-counted
            live: dict[int, list[int]] = {}  # storage address -> [nbytes, saved tensors holding it]
            held = {"now": 0, "peak": 0}

            class Saved:
                def __init__(self, t):
                    local = t._local_tensor if isinstance(t, DTensor) else t
                    try:
                        storage = local.untyped_storage()
                        self.key, nbytes = storage.data_ptr(), storage.nbytes()
                    except RuntimeError:  # no plain storage (a wrapper subclass): its own bytes
                        self.key, nbytes = id(local), local.nbytes
                    self.t = t
                    entry = live.setdefault(self.key, [nbytes, 0])
                    if entry[1] == 0:
                        held["now"] += nbytes
                        held["peak"] = max(held["peak"], held["now"])
                    entry[1] += 1

                def __del__(self):
                    entry = live[self.key]
                    entry[1] -= 1
                    if entry[1] == 0:
                        held["now"] -= entry[0]
                        del live[self.key]

            hooks = [m.register_forward_hook(lambda mod, args, out: outputs.add(str(out.dtype)))
                     for s in stages for m in s.modules() if isinstance(m, torch.nn.Linear)]
            try:
                with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
                    return super()._forward_backward(stages, schedule, micro, dims, coords)
            finally:
                for h in hooks:
                    h.remove()
                head = next((s.output.weight for s in stages if s.output is not None), None)
                self.probe = {
                    "linear_outputs": sorted(x.removeprefix("torch.") for x in outputs),
                    "master_weights": sorted({str(p.dtype).removeprefix("torch.") for s in stages
                                              for p in s.parameters()}),
                    "saved_bytes": held["peak"],
                    "head_placements": [str(p) for p in head.placements] if isinstance(head, DTensor) else None,
                }

        def __call__(self, ctx):
            result = super().__call__(ctx)
            if dist_env().rank == 0:
                atomic_write_text(ctx.stage_dir / "probe.json", json.dumps({"summary": result["precision"],
                                                                           **self.probe}))
            return result

    return ProbingPretrain(cfg)
