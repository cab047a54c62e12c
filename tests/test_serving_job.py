"""job=infer stage functions: sharding, input order, error records, kill and rerun."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from jobs_for_tests import wait_for
from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
from puyu.launcher.pipeline import Pipeline
from puyu.serving.config import InferJobConfig, RuntimeConfig, SamplingParams, ServingError
from puyu.serving.job import build_infer_stages
from puyu.serving.llm import LLM
from toy_models import wiki_texts

N_PROMPTS = 40


def run_in_process(stages, run_dir):
    """Every pending task of every stage here (``cluster=inline``), completion markers and all."""
    return Pipeline(stages, run_dir, ClusterConfig(kind=ClusterKind.inline), LauncherConfig()).run()


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    """Real prompts (Wikipedia leads, first words) with invalid requests mixed in."""
    texts = wiki_texts()[5000:5000 + N_PROMPTS]
    lines = [json.dumps({"id": f"q{i}", "prompt": " ".join(t.split()[: 4 + i % 30])}) for i, t in enumerate(texts)]
    lines[3] = json.dumps({"prompt": ""})
    lines[7] = "{not json"
    lines[11] = json.dumps({"prompt": "hello", "sampling": {"temperature": -1}})
    lines[17] = json.dumps({"prompt": "word " * 600})
    lines[21] = json.dumps({"messages": [{"role": "user", "content": "Tell me about rivers."}],
                            "sampling": {"temperature": 0.7, "top_p": 0.9}})
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(engine, input_file, shards=4):
    return InferJobConfig(kind="infer", engine=str(engine), input=str(input_file), shards=shards,
                          sampling=SamplingParams(max_tokens=8, ignore_eos=True),
                          runtime=RuntimeConfig(block_size=8, num_blocks=128, max_num_batched_tokens=128))


@pytest.fixture(scope="module")
def clean_run(engine, input_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    stages = build_infer_stages(config(engine, input_file))
    assert [(s.name, s.shards) for s in stages] == [("infer", 4), ("infer_merge", 1)]
    run_in_process(pickle.loads(pickle.dumps(stages)), run_dir)
    return run_dir


def read_outputs(run_dir):
    return [json.loads(ln) for ln in (run_dir / "infer" / "outputs.jsonl").read_text().splitlines()]


def test_outputs_in_input_order_with_error_records(engine, input_file, clean_run):
    out = read_outputs(clean_run)
    assert [r["index"] for r in out] == list(range(N_PROMPTS))
    errors = {r["index"]: r["error"] for r in out if "error" in r}
    assert sorted(errors) == [3, 7, 11, 17]
    assert "prompts.jsonl:4: empty prompt" in errors[3] and "prompts.jsonl:8: invalid JSON" in errors[7]
    assert "temperature must be >= 0" in errors[11] and "exceeds the model length" in errors[17]
    assert out[0]["id"] == "q0" and len(out[0]["token_ids"]) == 8 and isinstance(out[0]["text"], str)
    # the same prompts through the runtime directly give the same greedy tokens
    direct = LLM(engine).generate([json.loads(input_file.read_text().splitlines()[i])["prompt"] for i in (0, 5, 30)],
                                  SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in direct] == [out[i]["token_ids"] for i in (0, 5, 30)]
    for rank in range(4):
        result = json.loads((clean_run / "infer" / "completions" / f"{rank:05d}").read_text())["result"]
        assert result["requests"] == 10 and result["tokens_per_s"] > 0
        progress = json.loads((clean_run / "infer" / "progress" / f"{rank:05d}.json").read_text())
        assert progress["n"] == progress["total"] >= result["requests"] - result["errors"], progress


def test_killed_task_rerun_gives_identical_outputs(engine, input_file, clean_run, tmp_path):
    killed = tmp_path / "killed"
    stages = build_infer_stages(config(engine, input_file))
    stage_file = tmp_path / "stages.pkl"
    stage_file.write_bytes(pickle.dumps(stages))
    script = ("import pickle, sys; from puyu.launcher.stage import TaskContext; from pathlib import Path\n"
              "stage = pickle.load(open(sys.argv[1], 'rb'))[0]\n"
              "stage.fn(TaskContext(Path(sys.argv[2]), Path(sys.argv[2]) / stage.name, 2, stage.shards))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(stage_file), str(killed)], stdout=subprocess.PIPE, text=True)
    assert "generating" in proc.stdout.readline()  # the task is inside generation: kill it there
    proc.kill()
    proc.wait()
    assert not (killed / "infer" / "parts" / "00002.jsonl").exists()
    run_in_process(stages, killed)
    assert (killed / "infer" / "outputs.jsonl").read_bytes() == (clean_run / "infer" / "outputs.jsonl").read_bytes()


def test_bad_job_config_is_one_clear_line(engine, tmp_path):
    with pytest.raises(ServingError, match="needs engine"):
        build_infer_stages(InferJobConfig(kind="infer"))
    with pytest.raises(ServingError, match="not found"):
        build_infer_stages(InferJobConfig(kind="infer", engine=str(engine), input=str(tmp_path / "nope.jsonl")))


def test_job_configs_are_omegaconf_structured_configs():
    from omegaconf import OmegaConf

    from puyu.serving.config import BuildEngineJobConfig

    conf = OmegaConf.merge(OmegaConf.structured(InferJobConfig(kind="infer")),
                           OmegaConf.from_dotlist(["sampling.temperature=0.5", "runtime.kv_dtype=int8", "shards=8"]))
    cfg = OmegaConf.to_object(conf)
    assert isinstance(cfg.sampling, SamplingParams) and cfg.sampling.temperature == 0.5 and cfg.shards == 8
    build = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BuildEngineJobConfig(kind="build_engine")),
                                                OmegaConf.from_dotlist(["build.quant=w4"])))
    assert build.build.quant == "w4"
    with pytest.raises(Exception, match="temprature"):
        OmegaConf.merge(OmegaConf.structured(InferJobConfig(kind="infer")), OmegaConf.from_dotlist(["sampling.temprature=1"]))


@pytest.fixture(params=["local", "slurm"])
def array_kind(request):
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")  # skips (or fails under make test) without the cluster
    return ClusterKind(request.param)


@pytest.mark.slow
def test_thousand_real_prompts_as_a_4_way_array_then_rerun_of_a_lost_task(engine, tmp_path, array_kind):
    texts = wiki_texts()[6000:7100]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": " ".join(t.split()[: 5 + i % 40])}) + "\n"
                            for i, t in enumerate(texts)))
    cfg = config(engine, path)
    cluster = ClusterConfig(kind=array_kind, time_min=20, signal_delay_s=30)
    run_dir = tmp_path / "run"
    results = Pipeline(build_infer_stages(cfg), run_dir, cluster, LauncherConfig(poll_s=1.0)).run()
    assert len(results["infer"]) == 4 and all(r["tokens_per_s"] > 0 for r in results["infer"])
    first = (run_dir / "infer" / "outputs.jsonl").read_bytes()
    records = [json.loads(ln) for ln in first.decode().splitlines()]
    assert [r["id"] for r in records] == list(range(len(texts))) and not any("error" in r for r in records)
    # task 2 lost (its part and marker gone, as after a node failure) and the merge redone: only it reruns
    (run_dir / "infer" / "parts" / "00002.jsonl").unlink()
    (run_dir / "infer" / "completions" / "00002").unlink()
    (run_dir / "infer_merge" / "completions" / "00000").unlink()
    kept = {r: (run_dir / "infer" / "parts" / f"{r:05d}.jsonl").stat().st_mtime_ns for r in (0, 1, 3)}
    Pipeline(build_infer_stages(cfg), run_dir, cluster, LauncherConfig(poll_s=1.0)).run()
    assert {r: (run_dir / "infer" / "parts" / f"{r:05d}.jsonl").stat().st_mtime_ns for r in (0, 1, 3)} == kept
    assert (run_dir / "infer" / "outputs.jsonl").read_bytes() == first


@pytest.mark.slow(reason="~45 s; test_eval_job's killed Slurm array task covers the pattern")
def test_slurm_array_task_killed_mid_run_then_rerun_redoes_only_it(engine, tmp_path, slurm_cluster):
    """Issue 6: 1,100 real prompts as a 4-way ``puyu job=infer cluster=slurm`` array; one array task is
    killed while it generates, the run fails naming it, rerunning the same ``run=`` resubmits only that
    task, and the outputs equal an uninterrupted run's byte for byte, every line once, in order."""
    texts = wiki_texts()[6000:7100]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": " ".join(t.split()[: 5 + i % 40])}) + "\n"
                            for i, t in enumerate(texts)))
    run_dir = tmp_path / "run"
    job = dict(shards=4, sampling=dict(max_tokens=16, ignore_eos=True),
               runtime=dict(block_size=8, num_blocks=1024, max_num_batched_tokens=512, threads=1))
    args = [sys.executable, "-m", "puyu.launcher", "job=infer", "cluster=slurm", "cluster.time_min=10",
            "launcher.poll_s=0.5", f"run={run_dir}", f"job.engine={engine}", f"job.input={path}",
            "job.shards=4", "job.sampling.max_tokens=16", "job.sampling.ignore_eos=true", "job.runtime.block_size=8",
            "job.runtime.num_blocks=1024", "job.runtime.max_num_batched_tokens=512", "job.runtime.threads=1"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        launch = run_dir / "launch.json"
        sub = wait_for(lambda: launch.exists() and json.loads(launch.read_text())["submissions"], 60, "submission")[0]
        assert sub["stage"] == "infer" and sub["ranks"] == [0, 1, 2, 3]
        victim = sub["job_ids"][2]
        log = run_dir / "infer" / "logs" / victim / f"{victim}_0_log.out"
        wait_for(lambda: log.exists() and "generating" in log.read_text(), 120, f"task {victim} to generate")
        # SIGKILL to the task's step: it dies at once inside LLM.generate, as under the OOM killer or a
        # node crash (cancelling the job instead sends SIGTERM, which submitit ignores, and SIGKILL only
        # KillWait seconds later: time enough for this task to finish)
        subprocess.run(["scancel", "--signal=KILL", f"{victim}.0"], check=True)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1, stderr[-2000:]
    assert f"stage 'infer' task {victim} (shard 2)" in stderr and f"{victim}_0_log.err" in stderr, stderr[-2000:]
    parts, marks = run_dir / "infer" / "parts", run_dir / "infer" / "completions"
    assert not (parts / "00002.jsonl").exists() and not (marks / "00002").exists(), "task 2 finished before the kill"
    assert not (run_dir / "infer" / "outputs.jsonl").exists()
    kept = {r: ((parts / f"{r:05d}.jsonl").stat().st_mtime_ns, (marks / f"{r:05d}").stat().st_mtime_ns)
            for r in (0, 1, 3)}

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    subs = json.loads(launch.read_text())["submissions"]
    assert [(s["stage"], s["ranks"]) for s in subs] == [("infer", [0, 1, 2, 3]), ("infer_merge", [0]),
                                                        ("infer", [2]), ("infer_merge", [0])]
    assert {r: ((parts / f"{r:05d}.jsonl").stat().st_mtime_ns, (marks / f"{r:05d}").stat().st_mtime_ns)
            for r in (0, 1, 3)} == kept
    out = (run_dir / "infer" / "outputs.jsonl").read_bytes()
    records = [json.loads(ln) for ln in out.decode().splitlines()]
    assert [r["id"] for r in records] == list(range(len(texts))) and not any("error" in r for r in records)
    assert all(len(r["token_ids"]) == 16 for r in records)

    # an uninterrupted run of the same job (inline: the same task code, same threads) gives the same bytes
    cfg = InferJobConfig(kind="infer", engine=str(engine), input=str(path), shards=job["shards"],
                         sampling=SamplingParams(**job["sampling"]), runtime=RuntimeConfig(**job["runtime"]))
    threads = torch.get_num_threads()
    try:
        run_in_process(build_infer_stages(cfg), tmp_path / "clean")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "clean" / "infer" / "outputs.jsonl").read_bytes() == out
