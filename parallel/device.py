"""Where training ranks compute: ``job.device=auto|cpu|cuda`` for pretraining and finetuning.

``auto`` is resolved by each rank where it runs (CUDA when that process sees a GPU), so a job
submitted from a login node without GPUs still trains on the compute nodes' GPUs. ``cuda`` is a
demand: refused at submit time when this machine has no CUDA (the one-line error names the key),
and again by a rank that finds none. On CUDA a rank uses GPU ``LOCAL_RANK`` and NCCL; on CPU, gloo.

Precision is one policy for every layout (``job.precision=auto|bf16|fp32``; auto: bf16 on CUDA, fp32 on
CPU): with bf16, matrix products run in bf16 while master weights, optimizer state and the gradient
reduction stay fp32. Where data parallelism shards the model, FSDP2's ``MixedPrecisionPolicy`` applies it
(parameters gathered in bf16, gradients reduced in fp32); elsewhere (one rank, TP or PP without DP) each
stage module runs its forward and loss under ``torch.autocast``. Pipeline schedules call the stage's own
forward, so a PP run with dp = 1 computes in bf16 too.
"""
from __future__ import annotations

from typing import Optional

import torch

from puyu.launcher.distributed import check_device as check_device_setting, resolve_device as resolve_setting
from puyu.launcher.errors import PuyuError

def check_device(name: str) -> None:
    """Refuse an unknown ``job.device``, or ``cuda`` where this process sees no CUDA."""
    check_device_setting("job.device", name, PuyuError)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """This rank's device: GPU ``local_rank`` for ``cuda`` (and ``auto`` with CUDA), else the CPU."""
    check_device(name)
    return torch.device("cuda", local_rank) if resolve_setting(name) == "cuda" else torch.device("cpu")


def backend(device: torch.device) -> str:
    """The process group backend for ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(name: str) -> None:
    """Refuse an unknown ``job.precision`` at submit time."""
    if name not in PRECISIONS:
        raise PuyuError(f"job.precision={name!r}; choose one of {', '.join(PRECISIONS)}")


def compute_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype matrix products run in: bf16, or None for fp32 throughout (auto: bf16 on CUDA only)."""
    check_precision(precision)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None
