"""The config tree: every config of every group composes; bad input ends in one clear line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from puyu.launcher.cli import preflight
from puyu.launcher.config import register_configs
from puyu.launcher.errors import PuyuError

CONF = Path(__file__).resolve().parents[1] / "conf"
PUYU = [sys.executable, "-m", "puyu.launcher"]
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))


def group_options():
    return [(g, y.stem) for g in GROUPS for y in sorted((CONF / g).glob("*.yaml"))]


@pytest.fixture(scope="module", autouse=True)
def _schemas():
    register_configs()


def test_the_tree_has_job_and_cluster_groups():
    assert {"job", "cluster"} <= set(GROUPS)
    assert {"pipeline", "probe", "status"} <= {o for g, o in group_options() if g == "job"}
    assert {"local", "slurm", "inline"} == {o for g, o in group_options() if g == "cluster"}


@pytest.mark.parametrize("group,option", group_options())
def test_every_config_composes(group, option):
    with initialize_config_module(config_module="puyu.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={option}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved[group] is not None
    assert OmegaConf.is_missing(cfg, "run") is False


@pytest.mark.parametrize("args,expected", [
    (["cluster.partitoin=x"], "unknown config key 'cluster.partitoin'; did you mean cluster.partition?"),
    (["job=nosuch"], "unknown job kind 'nosuch' (available: "),
    (["cluster=nosuch"], "unknown cluster option 'nosuch' (available: inline, local, slurm)"),
    (["job=probe", "job.shards=many"], "bad value for job.shards"),
    (["cluster.kind=cloud"], "bad value for cluster.kind"),
    (["bogus=1"], "unknown config key 'bogus' (valid keys of the top level: cluster, job, launcher, run)"),
    # two unknown keys: the valid ones are still listed, and a job key given at the top level is pointed to
    (["job=infer", "engine=/x", "input=/y"],
     "unknown config key 'engine'; did you mean job.engine? (valid keys of the top level: cluster, job, launcher, run)"),
])
def test_bad_input_is_named(args, expected):
    with pytest.raises(PuyuError) as info:
        preflight(args)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_sweep_values_are_checked_before_submission():
    with pytest.raises(PuyuError, match="bad value for job.shards"):
        preflight(["-m", "job=probe", "job.shards=x,2"])


@pytest.mark.parametrize("args,expected", [
    (["job=nosuch"], "puyu: error: unknown job kind 'nosuch'"),
    (["cluster.partitoin=debug"], "puyu: error: unknown config key 'cluster.partitoin'"),
    (["job=status", "run=/nonexistent/run"], "puyu: error: run directory /nonexistent/run does not exist"),
    # stage builders' checks of inputs (plain ValueErrors of each stage) also end in one line
    (["job=infer", "job.engine=/x", "job.input=/nonexistent.jsonl", "run=/tmp/puyu-never"],
     "puyu: error: job=infer: input /nonexistent.jsonl not found"),
    (["job=agent", "job.engine=/x", "job.input=/nonexistent.jsonl", "run=/tmp/puyu-never"],
     "puyu: error: job=agent: input /nonexistent.jsonl not found"),
    (["job=data", "job.data.shards=0", "run=/tmp/puyu-never"], "puyu: error: data job: shards must be >= 1"),
])
def test_cli_prints_one_error_line(args, expected):
    out = subprocess.run([*PUYU, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr


def test_dry_run_prints_sbatch_scripts_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "dry"
    out = subprocess.run([*PUYU, "job=probe", "cluster=slurm", "job.shards=8", "cluster.array_parallelism=2",
                          "cluster.partition=gpu", "cluster.account=proj", "cluster.setup=[module load cuda]",
                          "launcher.dry_run=true", f"run={run_dir}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for flag in ("#SBATCH --array=0-7%2", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --signal=USR2@90", "module load cuda", "srun "):
        assert flag in script, flag
    assert not run_dir.exists(), "a dry run wrote a run directory"
