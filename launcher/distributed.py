"""Process ranks for torch.distributed, from wherever the task was started.

One task per device: under Slurm (``srun``) submitit's JobEnvironment knows the ranks and the
allocation's hosts; under ``torchrun`` the usual variables are set; otherwise it is one process.
``dist_env().export()`` sets MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK so that
``torch.distributed.init_process_group("env://")`` works the same in all three.
"""
from __future__ import annotations

import dataclasses
import os

from puyu.launcher.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def check_device(key: str, value: str, error: type[Exception] = ConfigError) -> None:
    """Refuse an unknown device setting, or ``cuda`` where this process sees no CUDA, naming ``key``
    (``job.device``, ``runtime.device``, ...) in one line of ``error``.

    torch is imported here, not at module level: configs import this module to check themselves."""
    if value not in DEVICES:
        raise error(f"{key}={value!r}; choose one of {', '.join(DEVICES)}")
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise error(f"{key}=cuda but CUDA is not available here (torch {torch.__version__}); "
                        f"use {key}=cpu, or auto to take a GPU wherever the process finds one")


def resolve_device(value: str) -> str:
    """``cpu`` or ``cuda`` for a checked device setting (auto: cuda when this process sees a GPU)."""
    if value != "auto":
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # slurm | torchrun | single

    def export(self) -> None:
        os.environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.local_rank))


def _port_for_job(job_id: str) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def dist_env() -> DistEnv:
    try:
        import submitit

        env = submitit.JobEnvironment()
        master = "127.0.0.1" if env.cluster == "local" else env.hostnames[0]
        return DistEnv(rank=env.global_rank, local_rank=env.local_rank, world_size=env.num_tasks,
                       master_addr=master, master_port=_port_for_job(env.raw_job_id),
                       source=env.cluster)
    except RuntimeError:  # not inside a submitit job
        pass
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                       world_size=int(os.environ["WORLD_SIZE"]),
                       master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(os.environ.get("MASTER_PORT", 29500)), source="torchrun")
    return DistEnv()
