"""Behaviour only a real Slurm cluster shows: multi-node ranks, requeue, time limits, cancellation,
Hydra sweeps as arrays, sacct-backed status, partition checks."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import jobs_for_tests as J
from jobs_for_tests import wait_for
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.errors import StageFailed
from puyu.launcher.pipeline import Pipeline
from puyu.launcher.stage import Stage

pytestmark = pytest.mark.usefixtures("slurm_cluster")
PUYU = [sys.executable, "-m", "puyu.launcher"]


def slurm(**kw) -> ClusterConfig:
    kw.setdefault("time_min", 10)
    kw.setdefault("signal_delay_s", 30)
    return ClusterConfig(kind=ClusterKind.slurm, **kw)


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def start_in_thread(pipeline: Pipeline) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["results"] = pipeline.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_two_nodes_two_tasks_see_ranks_and_one_master(tmp_path):
    Pipeline([Stage("echo", J.echo)], tmp_path, slurm(nodes=2, tasks_per_node=2), LauncherConfig(poll_s=0.5)).run()
    ranks = [json.loads(p.read_text()) for p in (tmp_path / "echo" / "ranks").glob("*.json")]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
    assert {r["world_size"] for r in ranks} == {4}
    assert len({r["master_addr"] for r in ranks}) == 1 and len({r["master_port"] for r in ranks}) == 1
    assert len({r["node"] for r in ranks}) == 2, f"tasks should span 2 nodes: {ranks}"


@pytest.mark.slow(reason="~30 s; test_finetune's Slurm requeue covers scontrol requeue + resume")
def test_scontrol_requeue_resumes_from_saved_step(tmp_path):
    # submitit ignores the requeue's SIGTERM; SIGKILL follows KillWait (5 s) later. 30 steps of
    # 0.5 s outlast that, so the job is really killed mid-way and restarted from its saved step.
    pipeline = Pipeline([Stage("train", J.StepCounter(steps=30, step_s=0.5))], tmp_path, slurm(),
                        LauncherConfig(poll_s=0.5))
    thread, outcome = start_in_thread(pipeline)
    state_path = tmp_path / "train" / "state-0.json"
    wait_for(lambda: state_path.exists() and json.loads(state_path.read_text())["step"] >= 3, 60, "step 3")
    job_id = pipeline.submitted[0].job_ids()[0]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    thread.join(180)
    assert not thread.is_alive(), "pipeline did not finish after the requeue"
    assert "error" not in outcome, outcome.get("error")
    state = outcome["results"]["train"][0]
    assert state["step"] == 30
    assert len(state["starts"]) == 2, state
    assert state["starts"][1]["restart_count"] == 1 and state["starts"][1]["step"] >= 3, state


@pytest.mark.slow(reason="a real 1-minute Slurm time limit and a requeue, ~150 s; the preemption test covers checkpoint + requeue")
def test_time_limit_checkpoints_on_signal_and_finishes_after_requeue(tmp_path):
    # 70 one-second steps cannot fit in a 1-minute limit: USR2 arrives up to 30 s before it,
    # the task checkpoints its in-memory step and is requeued, and the next run finishes.
    cluster = slurm(time_min=1, signal_delay_s=30, max_num_timeout=5)
    results = Pipeline([Stage("train", J.StepCounter(steps=70, step_s=1.0))], tmp_path, cluster,
                       LauncherConfig(poll_s=1.0)).run()
    state = results["train"][0]
    assert state["step"] == 70
    assert state["checkpoints"] >= 1 and len(state["starts"]) >= 2, state
    # Slurm may send the signal up to a minute early (its check interval), even before a first step:
    # what must hold is that no restart loses progress and some restart resumed from a saved step
    steps = [s["step"] for s in state["starts"]]
    assert steps == sorted(steps) and [s["restart_count"] for s in state["starts"]] == list(range(len(steps))), state
    assert any(s["step"] > 0 for s in state["starts"][1:]), state


def test_cancelled_job_is_reported_cancelled(tmp_path):
    pipeline = Pipeline([Stage("sleepy", J.Timed(300.0))], tmp_path, slurm(), LauncherConfig(poll_s=0.5))
    thread, outcome = start_in_thread(pipeline)
    wait_for(lambda: pipeline.submitted and squeue_state(pipeline.submitted[0].job_ids()[0]) == "RUNNING", 60,
             "the job to run")
    subprocess.run(["scancel", pipeline.submitted[0].job_ids()[0]], check=True)
    thread.join(90)
    assert not thread.is_alive(), "the launcher hangs on a cancelled job"
    err = outcome.get("error")
    assert isinstance(err, StageFailed) and err.state.startswith("CANCELLED"), repr(err)


def test_task_cancelled_after_its_outputs_is_named_and_a_rerun_goes_on(tmp_path):
    """A plain scancel's SIGTERM does not stop a submitit task at once: it may finish its outputs and its
    marker and still end CANCELLED, which makes Slurm cancel the ``afterok`` stage after it. The launcher
    names the cancelled task (not the dependent stage), and a rerun runs only what is left."""
    run_dir = tmp_path / "run"
    stages = lambda: [Stage("short", J.Announced(1.0)), Stage("after", J.echo)]  # noqa: E731
    pipeline = Pipeline(stages(), run_dir, slurm(), LauncherConfig(poll_s=0.5))
    thread, outcome = start_in_thread(pipeline)
    first = wait_for(lambda: pipeline.submitted and pipeline.submitted[0].job_ids()[0], 60, "the submission")
    # cancel once the task body runs (the interpreter's start-up under load can outlast KillWait)
    wait_for(lambda: (run_dir / "short" / "started" / "0").exists(), 120, "the first task to start")
    subprocess.run(["scancel", first], check=True)
    thread.join(120)
    assert not thread.is_alive(), "the launcher hangs"
    err = outcome.get("error")
    assert (run_dir / "short" / "completions" / "00000").exists(), \
        "Slurm killed the task before it finished: the test cluster's KillWait (5 s) must exceed the task's 1 s"
    assert isinstance(err, StageFailed) and err.stage == "short" and err.state == "CANCELLED", repr(err)
    assert "outputs are complete" in str(err) and "rerun the same run=" in str(err), str(err)
    Pipeline(stages(), run_dir, slurm(), LauncherConfig(poll_s=0.5)).run()
    subs = json.loads((run_dir / "launch.json").read_text())["submissions"]
    assert [(s["stage"], s["ranks"]) for s in subs] == [("short", [0]), ("after", [0]), ("after", [0])]


def test_failed_pipeline_cancels_the_next_stage_and_status_names_the_log(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed) as info:
        Pipeline([Stage("bad", J.fail), Stage("after", J.echo)], run_dir, slurm(), LauncherConfig(poll_s=0.5)).run()
    assert Path(info.value.log_path).exists()
    after_id = json.loads((run_dir / "launch.json").read_text())["submissions"][1]["job_ids"][0]
    wait_for(lambda: squeue_state(after_id) == "", 30, "the dependent stage to leave the queue")
    out = subprocess.run([*PUYU, "job=status", f"run={run_dir}"], capture_output=True, text=True)
    assert out.returncode == 1, out
    assert "bad" in out.stdout and "FAILED" in out.stdout and "failed task log:" in out.stdout, out.stdout
    assert "after" in out.stdout and "CANCELLED" in out.stdout, out.stdout


def test_cli_runs_a_job_on_slurm(tmp_path):
    run_dir = tmp_path / "probe"
    out = subprocess.run([*PUYU, "job=probe", "cluster=slurm", "job.shards=2", "cluster.partition=debug",
                          f"run={run_dir}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"run directory: {run_dir}" in out.stdout
    assert sorted(p.name for p in (run_dir / "probe" / "completions").iterdir()) == ["00000", "00001"]


def test_invalid_partition_is_one_clear_line(tmp_path):
    out = subprocess.run([*PUYU, "job=probe", "cluster=slurm", "cluster.partition=nosuch", f"run={tmp_path}/r"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == ["puyu: error: cluster.partition='nosuch' is not a partition of this cluster "
                     "(available: debug, high, low)"], out.stderr


def test_hydra_multirun_sweep_runs_as_one_array(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run([*PUYU, "-m", "hydra/launcher=submitit_slurm", "job=probe", "job.message=a,b",
                          "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=5",
                          f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    messages = sorted(json.loads((sweep / n / "probe" / "completions" / "00000").read_text())["result"]["message"]
                      for n in ("0", "1"))
    assert messages == ["a", "b"]
    task_dirs = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name]
    assert len(task_dirs) == 2 and len({d.split("_")[0] for d in task_dirs}) == 1, task_dirs  # 1 array, 2 tasks


def test_ctrl_c_cancels_the_pipelines_jobs(tmp_path):
    run_dir = tmp_path / "run"
    # SIGINT's default disposition in the launcher, as in a terminal: a make test started in the
    # background by a non-interactive shell passes SIGINT down ignored, and Python then installs no
    # KeyboardInterrupt handler
    proc = subprocess.Popen([*PUYU, "job=probe", "cluster=slurm", "job.sleep_s=300", f"run={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = run_dir / "launch.json"
    wait_for(manifest.exists, 60, "the job to be submitted")
    job_id = json.loads(manifest.read_text())["submissions"][0]["job_ids"][0]
    wait_for(lambda: squeue_state(job_id) == "RUNNING", 60, "the job to run")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    wait_for(lambda: squeue_state(job_id) == "", 30, "the job to leave the queue")


def test_preempted_job_checkpoints_and_requeues(tmp_path):
    # the whole cluster runs a checkpointable job in the preemptible partition; a job in "high"
    # takes it over: Slurm signals the low job, which checkpoints, requeues, and later finishes
    pipeline = Pipeline([Stage("train", J.StepCounter(steps=40, step_s=0.5))], tmp_path,
                        slurm(partition="low", exclusive=True), LauncherConfig(poll_s=0.5))
    thread, outcome = start_in_thread(pipeline)
    state_path = tmp_path / "train" / "state-0.json"
    wait_for(lambda: state_path.exists() and json.loads(state_path.read_text())["step"] >= 3, 60, "step 3")
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "4", "--exclusive", "-o", "/dev/null",
                           "--wrap", "sleep 2"], capture_output=True, text=True, check=True).stdout.strip()
    thread.join(240)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    state = outcome["results"]["train"][0]
    assert state["step"] == 40 and state["checkpoints"] >= 1, state
    assert len(state["starts"]) >= 2 and state["starts"][1]["step"] > 0, state
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", high, "-o", "State"], capture_output=True, text=True)
    assert out.stdout.split()[0] == "COMPLETED", out.stdout
