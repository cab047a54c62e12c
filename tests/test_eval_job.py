"""``job=eval``: 2 models × 3 real datasets cut into tasks, one report; reruns redo only unfinished tasks.

The engines are tiny random models (what is checked here is the job: partitioning, caching, reuse,
reports, failures), built once per module with a tokenizer trained on real text.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs_for_tests import wait_for
from puyu.evaluation.config import EvalJobConfig, InferenceConfig
from puyu.evaluation.job import eval_stages
from puyu.evaluation.metrics import score
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.pipeline import Pipeline
from puyu.model import Transformer, get_flavor, save_model
from puyu.serving.build import build_engine
from puyu.serving.config import BuildEngineJobConfig, RuntimeConfig
from toy_models import make_tokenizer, wiki_texts

PUYU = [sys.executable, "-m", "puyu.launcher"]
DATASETS = ["mmlu", "gsm8k", "humaneval"]
LIMITS = {"mmlu": 6, "gsm8k": 3, "humaneval": 3}
MAX_TASK_COST = 6000.0  # small, so every (model, dataset) pair is cut into a few tasks
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    tok = make_tokenizer(wiki_texts()[:2000], root / "tokenizer.json", vocab_size=1024)
    out = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        torch.manual_seed(seed)
        save_model(Transformer(get_flavor("tiny", vocab_size=tok.tok.get_vocab_size())), root / f"{name}_ckpt")
        build_engine(BuildEngineJobConfig(kind="build_engine", checkpoint=str(root / f"{name}_ckpt"),
                                          tokenizer=str(root / "tokenizer.json")), root / name / "engine")
        out[name] = root / name / "engine"
    return out


def config(engines, **kw) -> EvalJobConfig:
    return EvalJobConfig(kind="eval", model_paths={k: str(v) for k, v in engines.items()}, datasets=list(DATASETS),
                         limits=dict(LIMITS), max_task_cost=MAX_TASK_COST,
                         infer=InferenceConfig(num_fewshot=0, max_tokens=MAX_TOKENS),
                         runtime=RuntimeConfig(kv_cache_mb=64, threads=1), **kw)


def run_in_process(stages, run_dir) -> dict:
    threads = torch.get_num_threads()
    try:
        return Pipeline(stages, run_dir, ClusterConfig(kind=ClusterKind.inline), LauncherConfig()).run()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_run(engines, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    results = run_in_process(eval_stages(config(engines)), run_dir)
    return run_dir, results


def test_two_models_three_datasets_give_one_report(engines, clean_run):
    run_dir, results = clean_run
    tasks = results["eval"]
    assert {(t["model"], t["dataset"]) for t in tasks} == {(m, d) for m in engines for d in DATASETS}
    assert len(tasks) > len(engines) * len(DATASETS), "the partitioner should cut some pairs into several tasks"
    assert not any(t["reused"] for t in tasks)
    summary = run_dir / "eval_summary"
    rows = list(csv.reader((summary / "report.csv").open()))
    assert rows[0] == ["dataset", "metric", "mode", "alpha", "beta"]
    metrics = {(r[0], r[1]) for r in rows[1:]}
    for m in ("acc_origin", "acc_circular", "perf_circular"):
        assert ("mmlu", m) in metrics
    assert any(d == "gsm8k" for d, _ in metrics) and any(d == "humaneval" for d, _ in metrics)
    for r in rows[1:]:
        assert all(v == "-" or 0.0 <= float(v) <= 100.0 for v in r[3:]), r
    md = (summary / "report.md").read_text()
    assert "| mmlu | acc_circular |" in md
    assert "Sandbox (humaneval): rlimits, " in md  # which protections the programs ran under
    page = (summary / "report.html").read_text()
    assert "data:image/png;base64," in page and "<details>" in page
    for model in engines:
        for ds in DATASETS:
            details = (summary / "details" / model / f"{ds}.jsonl").read_text().splitlines()
            assert len(details) >= LIMITS[ds]
    # the mmlu details hold one record per circular variant: 4 rotations of each 4-option question
    assert len((summary / "details" / "alpha" / "mmlu.jsonl").read_text().splitlines()) == 4 * LIMITS["mmlu"]
    # per category and subject: each group scored over its own items (a category is the micro average)
    groups = list(csv.reader((summary / "report_groups.csv").open()))
    assert groups[0] == ["dataset", "by", "group", "items", "metric", "alpha", "beta"]
    subjects = [g for g in groups[1:] if g[:2] == ["mmlu", "subject"]]
    assert len(subjects) == LIMITS["mmlu"] and {g[4] for g in subjects} == {"acc_circular"}
    records = [json.loads(ln) for ln in (summary / "details" / "alpha" / "mmlu.jsonl").read_text().splitlines()]
    categories = [g for g in groups[1:] if g[:2] == ["mmlu", "category"]]
    assert categories and sum(int(g[3]) for g in categories) == LIMITS["mmlu"]
    for g in categories:
        mine = [r for r in records if r["category"] == g[2]]
        assert float(g[5]) == pytest.approx(score("mc", mine)["acc_circular"], abs=0.005)
    assert "## Per category and subject" in md and "Per category and subject" in page


def test_rerun_of_the_same_run_submits_nothing(engines, clean_run):
    run_dir, _ = clean_run
    stages = eval_stages(config(engines))
    assert [s.pending_ranks(run_dir) for s in stages] == [[], []]


def test_reuse_recomputes_only_missing_tasks_and_gives_the_identical_report(engines, clean_run, tmp_path):
    run_dir, results = clean_run
    lost = results["eval"][2]
    victim = run_dir / "eval" / "predictions" / lost["model"] / lost["dataset"] / f"{lost['key']}.jsonl"
    partial = tmp_path / "partial"
    # an earlier run where one task never finished: copy the clean run without that task's files
    subprocess.run(["cp", "-r", str(run_dir), str(partial)], check=True)
    (partial / victim.relative_to(run_dir)).unlink()
    again = run_in_process(eval_stages(config(engines, reuse=str(partial))), tmp_path / "again")
    computed = [(t["model"], t["dataset"], t["key"]) for t in again["eval"] if not t["reused"]]
    assert computed == [(lost["model"], lost["dataset"], lost["key"])]
    for name in ("report.md", "report.csv"):
        assert (tmp_path / "again" / "eval_summary" / name).read_bytes() == (run_dir / "eval_summary" / name).read_bytes()


def test_unknown_dataset_or_model_is_one_error_line(engines, tmp_path):
    base = [*PUYU, "job=eval", "cluster=inline", f"run={tmp_path}/r", f"job.models=[{engines['alpha']}]"]
    out = subprocess.run([*base, "job.datasets=[mmlu,nosuch]"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown dataset 'nosuch'" in lines[0], out.stderr
    out = subprocess.run([*PUYU, "job=eval", "cluster=inline", f"run={tmp_path}/r2", "job.models=[gamma]"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "unknown model 'gamma'" in lines[0], out.stderr
    bad = tmp_path / "mine.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n{broken\n")
    out = subprocess.run([*base, "job.datasets=[mine]", f"++job.custom_datasets={{mine:{{path:{bad},kind:mc}}}}"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and f"{bad}:2" in lines[0], out.stderr


@pytest.mark.slow(reason="~38 s; a Slurm task that dies, the cancelled summary and status naming its log: "
                         "test_launcher_slurm's failed-pipeline test; reuse of the finished tasks: "
                         "test_reuse_recomputes_only_missing_tasks_and_gives_the_identical_report")
def test_slurm_array_with_a_killed_task_then_reuse_redoes_only_it(engines, clean_run, tmp_path, slurm_cluster):
    """The issue's run: 2 models × 3 datasets as a sharded array on the test cluster; one task is killed
    while it runs (the others go on; the summary, which depends on all of them, is cancelled) and
    ``job=status`` names it with its log; a new run with ``job.reuse`` recomputes only that task and its
    report equals the uninterrupted run's byte for byte."""
    clean_dir, clean_results = clean_run
    args = [*PUYU, "job=eval", "cluster=slurm", "cluster.time_min=10", "cluster.array_parallelism=3",
            "launcher.poll_s=0.5", "job.models=[" + ",".join(f"{k}:{v}" for k, v in engines.items()) + "]",
            f"job.datasets=[{','.join(DATASETS)}]", "++job.limits={" + ",".join(f"{k}:{v}" for k, v in LIMITS.items()) + "}",
            f"job.max_task_cost={MAX_TASK_COST}", "job.infer.num_fewshot=0", f"job.infer.max_tokens={MAX_TOKENS}",
            "job.runtime.kv_cache_mb=64", "job.runtime.threads=1"]
    first_dir = tmp_path / "first"
    submit = subprocess.run([*args, f"run={first_dir}", "launcher.wait=false"], capture_output=True, text=True,
                            timeout=120)
    assert submit.returncode == 0, submit.stderr[-2000:]
    subs = json.loads((first_dir / "launch.json").read_text())["submissions"]
    assert [s["stage"] for s in subs] == ["eval", "eval_summary"]
    n = len(clean_results["eval"])
    assert subs[0]["ranks"] == list(range(n))
    rank = 1
    victim = subs[0]["job_ids"][rank]
    log = first_dir / "eval" / "logs" / victim / f"{victim}_0_log.out"
    # the tiny models predict in about a second, so the kill comes as soon as Slurm runs the task
    # (the interpreter is still starting); any later and it could be done
    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", victim, "-o", "%T"], capture_output=True,
                                     text=True).stdout.strip() == "RUNNING", 180, f"task {victim} to run")
    # SIGKILL at once: a plain scancel's SIGTERM is held off by submitit for KillWait seconds
    subprocess.run(["scancel", "--signal=KILL", "--full", victim], check=True)
    ids = sorted({j.split("_")[0] for s in subs for j in s["job_ids"]})
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True,
                                         text=True).stdout.strip(), 300, "the first run's jobs to end")
    done = {r for r in range(n) if (first_dir / "eval" / "completions" / f"{r:05d}").exists()}
    assert done == set(range(n)) - {rank}, f"only the killed task should be unfinished, finished: {sorted(done)}"
    assert not list((first_dir / "eval" / "predictions").rglob(f"{clean_results['eval'][rank]['key']}*")), \
        "a killed task must leave no predictions behind"
    assert not (first_dir / "eval_summary" / "report.md").exists()
    status = subprocess.run([*PUYU, "job=status", f"run={first_dir}"], capture_output=True, text=True, timeout=120)
    assert victim in status.stdout and str(log.parent) in status.stdout, status.stdout

    second_dir = tmp_path / "second"
    again = subprocess.run([*args, f"run={second_dir}", f"job.reuse={first_dir}"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    results = [json.loads((second_dir / "eval" / "completions" / f"{r:05d}").read_text())["result"] for r in range(n)]
    assert [r for r, res in enumerate(results) if not res["reused"]] == [rank]
    for name in ("report.md", "report.csv"):
        assert (second_dir / "eval_summary" / name).read_bytes() == (clean_dir / "eval_summary" / name).read_bytes()
