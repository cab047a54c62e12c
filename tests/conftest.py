"""Shared fixtures: the test Slurm cluster, and test callables shipped to jobs by value.

Jobs run in fresh interpreters that cannot import this ``tests`` folder, so the modules holding
job callables are registered with cloudpickle to travel by value.
"""
from __future__ import annotations

import os
import shutil
import sys
import subprocess

import cloudpickle
import pytest

import jobs_for_tests

cloudpickle.register_pickle_by_value(jobs_for_tests)

REQUIRE_SLURM = os.environ.get("PUYU_REQUIRE_SLURM") == "1"  # set by `make test`
REQUIRE_EXTENSION = os.environ.get("PUYU_REQUIRE_EXTENSION") == "1"  # set by `make test`
REQUIRE_CUDA = os.environ.get("PUYU_REQUIRE_CUDA") == "1"  # set by scripts/gpu_check.sh


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped unless --runslow")
    config.addinivalue_line("markers", "slurm: needs the test Slurm cluster (tests/cluster/start_cluster.sh)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")


def _extensions() -> list[tuple[str, str | None, str]]:
    """(name, why it is not in use or None, what a built one offers) of each C++ extension: the training
    ops (puyu.model.ops) and the serving runtime's (puyu.serving.ops)."""
    from puyu.model import ops
    from puyu.serving import ops as serving_ops

    return [("fused ops", ops.extension_problem(),
             f" (CUDA kernels: {'yes' if ops.extension_available('cuda') else 'no'})"),
            ("serving ops", serving_ops.extension_problem(), " (CPU kernels)")]


def pytest_sessionstart(session):
    """Under `make test` an extension that did not build (or cannot run here) ends the run before any test,
    as a failure with its one-line reason, instead of every kernel test skipping."""
    if not REQUIRE_EXTENSION:
        return
    for name, problem, _ in _extensions():
        if problem:
            pytest.exit(f"PUYU_REQUIRE_EXTENSION=1 and the {name} extension is not in use: {problem}", returncode=1)


def pytest_report_header(config):
    """Whether the kernel tests run or skip, said once per extension at the top of the run."""
    return [f"puyu {name} extension: not in use, its tests skip ({problem})" if problem
            else f"puyu {name} extension: built{built}" for name, problem, built in _extensions()]


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    for item in items:
        mark = item.get_closest_marker("slow")
        if mark is not None:
            why = mark.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"slow test ({why}): make test-slow runs it" if why
                                             else "slow test: make test-slow runs it"))


@pytest.fixture(autouse=True)
def _cuda_marker(request):
    """Skips a ``cuda``-marked test without a usable GPU (fails it instead under PUYU_REQUIRE_CUDA=1)."""
    if request.node.get_closest_marker("cuda") is None:
        return
    import torch

    if not torch.cuda.is_available():
        msg = f"needs a CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none"
        if REQUIRE_CUDA:
            pytest.fail(msg)
        pytest.skip(msg)


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "Slurm client commands are not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
        nodes = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"],
                               capture_output=True, text=True, timeout=20).stdout.split()
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"Slurm does not answer ({exc})"
    if "is UP" not in ping:
        return "slurmctld is not up"
    if len(set(nodes)) < 2:
        return f"fewer than 2 usable nodes ({sorted(set(nodes))})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real test cluster; under `make test` its absence fails the test instead of skipping it."""
    problem = _cluster_problem()
    if problem:
        msg = f"no Slurm test cluster: {problem} (start it with tests/cluster/start_cluster.sh, or run make test)"
        if REQUIRE_SLURM:
            pytest.fail(msg)
        pytest.skip(msg)
    return True


@pytest.fixture(scope="session")
def slurm_corpus(slurm_cluster, tmp_path_factory):
    """A real corpus built once per session by `puyu job=data` as 4-way arrays on the Slurm cluster.

    Returns (run_dir, completed process); the data tests check it, pretraining trains on it.
    """
    from puyu.data_pipeline import corpora

    try:
        corpora.wiki_summaries_file()
        corpora.debian_root("python3.11-doc")
    except corpora.CorpusMissing as err:
        pytest.fail(f"real corpus missing ({err}); `make data` fetches it")
    run_dir = tmp_path_factory.mktemp("slurm_corpus") / "corpus"
    # the Wikipedia leads, Python docs and this machine's Debian copyright files (licence texts: real exact and
    # near copies of each other, so the Slurm run's dedup has work; lib* left out for the tokenizer's time)
    inputs = ("[{kind: wiki_summaries, lang: en-us, max_docs: 3000}, {kind: debian, package: python3.11-doc, "
              "glob: 'usr/share/doc/python3.11/html/_sources/**/*.txt', max_docs: 200}, "
              "{kind: text, path: /usr/share/doc, glob: '[!l]*/copyright'}]")
    out = subprocess.run([sys.executable, "-m", "puyu.launcher", "job=data", "cluster=slurm", "job.data.shards=4",
                          f"job.data.inputs={inputs}", "job.data.tokenizer.vocab_size=2000", f"run={run_dir}"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A tiny random InternLM2 engine (seed 3) with a 1024-token BPE trained on Wikipedia leads: what the
    serving and agent job tests run (they check the jobs, not the model's answers)."""
    import torch

    from puyu.model import Transformer, get_flavor, save_model
    from puyu.serving.build import build_engine
    from puyu.serving.config import BuildEngineJobConfig
    from toy_models import make_tokenizer, wiki_texts

    root = tmp_path_factory.mktemp("engine")
    tok = make_tokenizer(wiki_texts()[:2000], root / "tokenizer.json", vocab_size=1024)
    torch.manual_seed(3)
    save_model(Transformer(get_flavor("tiny", vocab_size=tok.tok.get_vocab_size())), root / "ckpt")
    build_engine(BuildEngineJobConfig(kind="build_engine", checkpoint=str(root / "ckpt"),
                                      tokenizer=str(root / "tokenizer.json")), root / "engine")
    return root / "engine"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The finetuning tests' base: tokenizer.json (2000 tokens) + a tiny InternLM2 pretrained for 20 steps on
    Wikipedia leads, saved as pretraining exports."""
    from puyu.data_pipeline.corpora import CorpusMissing
    from puyu.model import save_model
    from toy_models import make_tokenizer, train_tiny, wiki_texts

    root = tmp_path_factory.mktemp("base")
    try:
        texts = wiki_texts()[:3000]
    except CorpusMissing as exc:
        pytest.skip(str(exc))
    tok = make_tokenizer(texts, root / "tokenizer.json", 2000)
    save_model(train_tiny(texts, tok, steps=20, batch=8), root / "model")
    return {"tokenizer": root / "tokenizer.json", "model": root / "model", "tok": tok}
