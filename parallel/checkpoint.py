"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), resumable in another layout.

Each checkpoint is a folder ``step-NNNNNNNN/`` that every rank writes its shards into. It counts
as complete only once ``complete.json`` exists: rank 0 writes it atomically, last, after all ranks
finished writing, so a job killed mid-save leaves an incomplete folder that resume ignores.
Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``, which stores
DTensor/FSDP shards under their unsharded names: loading into a different TP/PP/DP layout reshards.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from puyu.launcher.atomic import atomic_write_text

log = logging.getLogger("puyu.checkpoint")
COMPLETE = "complete.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def latest_complete(root: Path) -> Optional[Path]:
    """The newest checkpoint folder under ``root`` whose completion record exists."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, path in reversed(steps):
        if (path / COMPLETE).exists():
            return path
    return None


def _state(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, dict]:
    """Model and optimizer state of every part (pipeline stage) of this rank, keyed by parameter name.

    Optimizer state is flattened per parameter (``state.<fqn>.exp_avg``) so the parts, each with
    its own optimizer, merge into one dict without clashing.
    """
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_sd, optim_sd = {}, {}
    for part, opt in zip(parts, optimizers):
        m, o = get_state_dict(part, opt, options=options)
        model_sd.update(m)
        optim_sd.update(o)
    return {"model": model_sd, "optim": optim_sd}


class Checkpointer:
    """Saves this rank's shards every so often; with ``async_save`` the writing overlaps training.

    An async save returns once the state is staged (copied) in memory and writes in a background
    thread over its own gloo group; its completion record is written when the next save starts or
    :meth:`wait` is called, after every rank's write finished. Either way the record comes last.
    """

    def __init__(self, root: Path, keep: int = 2, async_save: bool = False):
        self.root, self.keep, self.async_save = Path(root), keep, async_save
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: Optional[tuple[Any, Path, dict]] = None

    def save(self, step: int, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
             extra: dict[str, Any]) -> Path:
        """Checkpoint ``step``; ``extra`` (JSON: consumed samples...) goes into the completion record."""
        self.wait()
        path, record = step_dir(self.root, step), {"step": step, **extra}
        state = self.state(parts, optimizers)
        if self.async_save:
            self._pending = (dcp.async_save(state, checkpoint_id=str(path), process_group=self._group), path, record)
        else:
            dcp.save(state, checkpoint_id=str(path))
            self._complete(path, record)
        return path

    def state(self, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
        """What a checkpoint holds: every part's model and optimizer state (subclasses may hold less)."""
        return _state(parts, optimizers)

    def wait(self) -> None:
        """Finish the async save in flight, if any, and record it complete."""
        if self._pending is not None:
            future, path, record = self._pending
            self._pending = None
            future.result()
            self._complete(path, record)

    def _complete(self, path: Path, record: dict) -> None:
        _barrier()
        if _rank() == 0:
            atomic_write_text(path / COMPLETE, json.dumps(record, sort_keys=True) + "\n")
            _prune(self.root, self.keep)
        _barrier()
        log.info("checkpoint step %d saved to %s", record["step"], path)


def load(path: Path, parts: list[torch.nn.Module], optimizers: Optional[list[torch.optim.Optimizer]]) -> dict:
    """Load a complete checkpoint into this rank's (possibly differently sharded) parts; returns its record.

    ``optimizers=None`` loads the model only (e.g. into one unsharded model, without a process group).
    """
    path = Path(path)
    record = json.loads((path / COMPLETE).read_text())
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    if optimizers is None:
        for part in parts:
            model_sd = get_model_state_dict(part)
            dcp.load({"model": model_sd}, checkpoint_id=str(path))
            set_model_state_dict(part, model_sd)
    else:
        state = _state(parts, optimizers)
        dcp.load(state, checkpoint_id=str(path))
        for part, opt in zip(parts, optimizers):
            set_state_dict(part, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=dataclasses.replace(options, strict=False))
    log.info("resumed from %s (step %d)", path, record["step"])
    return record


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).exists())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
