"""The callable submitit runs for each task of a stage: skip if done, run, leave the marker.

It is always checkpointable, so a job that is preempted or reaches its time limit is requeued
instead of lost: if the stage's own function is checkpointable its ``checkpoint`` decides what
is resubmitted (e.g. with its in-memory state); otherwise the same task is resubmitted and the
function resumes from what it saved on disk.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from submitit.helpers import DelayedSubmission

from puyu.launcher.distributed import dist_env
from puyu.launcher.stage import TaskContext

log = logging.getLogger("puyu.task")


class StageTask:
    def __init__(self, stage_name: str, fn: Callable[[TaskContext], Any], run_dir: str, world_size: int):
        self.stage_name = stage_name
        self.fn = fn
        self.run_dir = str(run_dir)
        self.world_size = world_size

    def context(self, rank: int) -> TaskContext:
        run_dir = Path(self.run_dir)
        return TaskContext(run_dir, run_dir / self.stage_name, rank, self.world_size)

    def __call__(self, rank: int) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        ctx = self.context(rank)
        env = dist_env()
        # A requeued single-process shard that had finished skips; in a multi-process job the
        # processes start at different times, so only the launcher (which submits pending shards) decides.
        if env.world_size == 1 and ctx.is_done():
            log.info("%s shard %d/%d already complete (%s): skipping", self.stage_name, rank, self.world_size,
                     ctx.marker())
            return ctx.done_result()
        log.info("%s shard %d/%d starting (process rank %d/%d via %s)", self.stage_name, rank,
                 self.world_size, env.rank, env.world_size, env.source)
        start = time.time()
        result = self.fn(ctx)
        if env.rank == 0:
            ctx.mark_done(result)
        log.info("%s shard %d/%d done in %.1f s", self.stage_name, rank, self.world_size, time.time() - start)
        return result

    def checkpoint(self, rank: int) -> DelayedSubmission | None:
        fn = self.fn
        if hasattr(fn, "checkpoint"):
            delayed = fn.checkpoint(self.context(rank))
            if delayed is None:
                return None
            fn = delayed.function
        log.info("%s shard %d: checkpointed, requeueing", self.stage_name, rank)
        return DelayedSubmission(StageTask(self.stage_name, fn, self.run_dir, self.world_size), rank)
