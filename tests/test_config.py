"""The config tree: every config of every group composes; bad input ends in one clear line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from puyu.launcher import jobs
from puyu.launcher.cli import preflight, run_job
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
    (["job=data", "job.data.dedup.bands=20", "job.data.dedup.rows=10", "run=/tmp/puyu-never"],
     "puyu: error: dedup: bands*rows = 200 exceeds num_perm = 128"),
    (["job=probe", "job.shards=0", "run=/tmp/puyu-never"], "puyu: error: stage 'probe': shards must be >= 1, got 0"),
    (["job=pipeline", "job.infer.shards=0", "run=/tmp/puyu-never", "launcher.dry_run=true"],
     "puyu: error: stage 'infer': shards must be >= 1, got 0"),
])
def test_cli_prints_one_error_line(args, expected):
    out = subprocess.run([*PUYU, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="puyu.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_missing_infer_input_is_a_puyu_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    cfg = _compose(["job=infer", f"job.engine={tmp_path}", f"job.input={missing}", f"run={tmp_path}/run"])
    with pytest.raises(PuyuError) as info:
        run_job(cfg)
    assert str(info.value) == f"job=infer: input {missing} not found"
    assert isinstance(info.value, ValueError)  # ServingError: callers catching ValueError still do
    assert not (tmp_path / "run").exists()


def test_a_stage_builders_bug_is_not_turned_into_one_line(monkeypatch, tmp_path):
    """Only PuyuError is the user's to fix; a ValueError from a bug in a builder propagates as itself."""
    def buggy_builder(cfg):
        raise ValueError("a bug in the stage builder")

    monkeypatch.setattr(jobs, "probe_stages", buggy_builder)
    cfg = _compose(["job=probe", f"run={tmp_path}/run"])
    with pytest.raises(ValueError, match="a bug in the stage builder") as info:
        run_job(cfg)
    assert not isinstance(info.value, PuyuError)


def test_cli_shows_the_traceback_of_a_stage_builders_bug(tmp_path):
    code = ("import sys, puyu.launcher.jobs as jobs\n"
            "def buggy(cfg):\n    raise ValueError('a bug in the stage builder')\n"
            "jobs.probe_stages = buggy\n"
            f"sys.argv = ['puyu', 'job=probe', 'run={tmp_path}/run']\n"
            "from puyu.launcher.cli import main\nmain()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ValueError: a bug in the stage builder" in out.stderr, out.stderr
    assert "puyu: error:" not in out.stderr, out.stderr


def test_cli_shows_the_traceback_of_an_inline_tasks_failure(tmp_path):
    """Inline, a task's non-PuyuError failure has no log file: its traceback is printed before the error line."""
    out = subprocess.run([*PUYU, "job=probe", "cluster=inline", "job.fail_rank=0", f"run={tmp_path}/run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "RuntimeError: probe shard 0 failed on purpose" in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("puyu: error: stage 'probe' task inline (shard 0) ended FAILED: RuntimeError: "), out.stderr


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
