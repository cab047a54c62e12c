"""Turn a ClusterConfig into a submitit executor (Slurm or local) and show what it would submit."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Optional

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from puyu.launcher.config import ClusterConfig, ClusterKind
from puyu.launcher.errors import PuyuError


def stage_cluster(cluster: ClusterConfig, overrides: dict[str, Any], stage: str) -> ClusterConfig:
    """The job's cluster options with one stage's overrides applied (unknown keys are an error)."""
    valid = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise PuyuError(f"stage {stage!r} overrides unknown cluster option(s) {unknown}; valid: {sorted(valid)}")
    return dataclasses.replace(cluster, **overrides)


def slurm_parameters(c: ClusterConfig, job_name: str, dependency: Optional[str] = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for these options (each maps onto one sbatch flag)."""
    params: dict[str, Any] = dict(
        job_name=job_name, nodes=c.nodes, ntasks_per_node=c.tasks_per_node, cpus_per_task=c.cpus_per_task,
        time=c.time_min, signal_delay_s=c.signal_delay_s, array_parallelism=c.array_parallelism,
        setup=list(c.setup), srun_args=list(c.srun_args),
        # a stage whose dependency failed is cancelled by Slurm instead of pending forever
        additional_parameters={"kill-on-invalid-dep": "yes", **dict(c.sbatch_extra)},
    )
    optional = dict(partition=c.partition, account=c.account, qos=c.qos, mem=c.mem, constraint=c.constraint,
                    dependency=dependency, gpus_per_node=c.gpus_per_node or None, exclusive=c.exclusive or None)
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def make_executor(c: ClusterConfig, folder: Path, job_name: str,
                  dependency: Optional[str] = None) -> submitit.Executor:
    """An executor whose logs go to ``folder/%j``; ``dependency`` (Slurm only) e.g. ``afterok:12:13``."""
    folder = Path(folder) / "%j"
    if c.kind is ClusterKind.slurm:
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=c.max_num_timeout, python=c.python)
        ex.update_parameters(**slurm_parameters(c, job_name, dependency))
        return ex
    if c.kind is ClusterKind.local:
        if c.nodes != 1:
            raise PuyuError(f"cluster.nodes={c.nodes}: the local executor has one node; use cluster=slurm")
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=c.max_num_timeout, python=c.python)
        ex.update_parameters(timeout_min=c.time_min, tasks_per_node=c.tasks_per_node,
                             signal_delay_s=c.signal_delay_s, setup=list(c.setup))
        return ex
    raise PuyuError(f"cluster.kind={c.kind.value} has no submitit executor (inline runs in this process)")


def sbatch_script(c: ClusterConfig, folder: Path, job_name: str, array_size: int,
                  dependency: Optional[str] = None) -> str:
    """The sbatch file submitit would write for this stage (for ``launcher.dry_run``).

    submitit creates its log folder on construction; a dry run writes nothing, so the executor is
    built on a scratch folder and the real path put back into the script.
    """
    with tempfile.TemporaryDirectory() as scratch:
        ex = make_executor(c, Path(scratch), job_name, dependency)
        params = dict(ex.parameters)
        if array_size > 1:
            params["map_count"] = array_size
        text = _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder, **params)
        return text.replace(scratch, str(Path(folder).absolute()))
