"""Where training ranks compute: ``job.device=auto|cpu|cuda`` for pretraining and finetuning.

``auto`` is resolved by each rank where it runs (CUDA when that process sees a GPU), so a job
submitted from a login node without GPUs still trains on the compute nodes' GPUs. ``cuda`` is a
demand: refused at submit time when this machine has no CUDA (the one-line error names the key),
and again by a rank that finds none. On CUDA a rank uses GPU ``LOCAL_RANK`` and NCCL; on CPU, gloo.

Precision follows the device and is not a setting here: on CUDA, bf16 compute with fp32 master
weights (FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, or autocast without
data parallelism); on CPU, fp32 throughout (bf16 matmuls there are slow and the parity tests
compare fp32 curves).
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


def param_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype FSDP2 gathers parameters in (and autocast computes in): bf16 on CUDA, None (fp32) else."""
    return torch.bfloat16 if device.type == "cuda" else None
