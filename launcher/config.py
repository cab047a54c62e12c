"""Structured configs, registered in Hydra's ConfigStore so a misspelt key fails at composition.

The tree: ``job`` (one dataclass per job kind, chosen by ``job=<kind>``), ``cluster`` (where the
job's tasks run), ``launcher`` (how puyu submits and waits) and ``run``, the run directory.
Job kinds are declared by their packages (:mod:`puyu.launcher.registry`); the YAML files under
``conf/`` extend the schemas stored here (``defaults: [/schema/<group>/<name>@_here_]``).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ClusterKind(enum.Enum):
    local = "local"    # submitit LocalExecutor: real subprocesses on this machine
    slurm = "slurm"    # submitit SlurmExecutor: sbatch/srun
    inline = "inline"  # this process, one task after another (debugging)


@dataclasses.dataclass
class ClusterConfig:
    """Where tasks run. Slurm fields map 1:1 onto sbatch options; local honours tasks/time/signal."""

    kind: ClusterKind = ClusterKind.local
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: Optional[str] = None  # sbatch --mem, e.g. "4G"
    time_min: int = 60
    signal_delay_s: int = 90  # USR2 this long before the time limit: checkpoint + requeue
    max_num_timeout: int = 3  # requeues allowed after hitting the time limit
    constraint: Optional[str] = None
    exclusive: bool = False
    array_parallelism: int = 64  # the %N throttle of array jobs
    sbatch_extra: dict[str, str] = dataclasses.field(default_factory=dict)  # more #SBATCH --key=value lines
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before srun, e.g. "module load cuda"
    srun_args: list[str] = dataclasses.field(default_factory=list)
    python: Optional[str] = None  # interpreter on the compute nodes; default: the launching one


@dataclasses.dataclass
class LauncherConfig:
    dry_run: bool = False  # print the sbatch script(s), submit nothing
    wait: bool = True  # wait for the pipeline and report; false: submit (with dependencies) and return
    poll_s: float = 2.0
    overwrite: bool = False  # a stage whose recorded settings differ: clear it and later stages, instead of refusing


@dataclasses.dataclass
class JobConfig:
    """Base of every job kind's config; ``kind`` names it in the registry (puyu.launcher.registry)."""

    kind: str = MISSING


@dataclasses.dataclass
class PuyuConfig:
    job: Any = MISSING
    cluster: ClusterConfig = MISSING
    launcher: LauncherConfig = dataclasses.field(default_factory=LauncherConfig)
    # The run directory: where this job writes (and, for job=status, the run to inspect).
    run: str = "runs/${now:%Y%m%d-%H%M%S}-${job.kind}"


def register_configs() -> None:
    """Store the schemas the YAML tree under conf/ builds on; a kind without a YAML file there (one an
    installed package outside puyu registers) is a ``job`` option with its schema's defaults."""
    from importlib.resources import files

    from puyu.launcher.registry import job_kinds

    cs = ConfigStore.instance()
    cs.store(name="puyu_schema", node=PuyuConfig)
    cs.store(group="schema/cluster", name="cluster", node=ClusterConfig)
    yaml_kinds = {p.name.removesuffix(".yaml") for p in files("puyu.conf").joinpath("job").iterdir()}
    for kind, spec in job_kinds().items():
        cs.store(group="schema/job", name=kind, node=spec.config_cls(kind=kind))
        if kind not in yaml_kinds:
            cs.store(group="job", name=kind, node=spec.config_cls(kind=kind))
