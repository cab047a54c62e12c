"""The data job end to end, in process, on real corpora: Megatron reads the result; a killed task reruns identically."""
from __future__ import annotations

import collections
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from jobs_for_tests import run_inline
from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job, layout
from puyu.data_pipeline.writers import read_docs



def real_config() -> C.DataJobConfig:
    try:
        corpora.wiki_summaries_file()
        corpora.debian_root(corpora.PYTHON_DOC_PACKAGE)
        corpora.debian_root("fortunes-zh")
        corpora.debian_copyright_files()
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    cfg = C.DataJobConfig(inputs=[
        C.InputSpec(kind="wiki_summaries", max_docs=2000),
        C.InputSpec(kind="debian", package=corpora.PYTHON_DOC_PACKAGE, glob=corpora.PYTHON_DOC_GLOB, max_docs=60),
        # real duplicates; lib* left out to keep the test fast (its 2 MB boost licences cost tokenizer time)
        C.InputSpec(kind="text", path="/usr/share/doc", glob="[!l]*/copyright"),
        C.InputSpec(kind="fortunes", package="fortunes-zh", glob="usr/share/games/fortunes/[st]*"),  # poems
    ], shards=4)
    cfg.filters.c4.enabled = False  # keep licence texts and short leads in, so dedup has work to do
    cfg.tokenizer.vocab_size = 2000
    cfg.tokenizer.sample_bytes = 2_000_000
    return cfg


def data_files(run_dir: Path) -> dict[str, bytes]:
    """Every output except completion markers, progress files and the summary (they hold timings)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not {"completions", "progress"} & set(p.parts) and p.parent.name != layout.SUMMARY
            and not p.name.startswith(".")} | {
        name: (run_dir / layout.SUMMARY / name).read_bytes() for name in ("corpus.bin", "corpus.idx")}


def test_data_job_end_to_end_then_kill_and_rerun(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    cfg = real_config()
    stages = job.build_data_stages(cfg)
    assert [s.shards for s in stages] == [4, 4, 4, 1, 4, 1, 4, 1]
    clean = tmp_path / "clean"
    run_inline(pickle.loads(pickle.dumps(stages)), clean)

    summary = json.loads((clean / layout.SUMMARY / "summary.json").read_text())
    dataset = IndexedDataset(str(clean / layout.SUMMARY / "corpus"))
    assert len(dataset) == summary["docs_out"] == summary["tokens"]["documents"] > 1000
    assert int(dataset.sequence_lengths.sum()) == summary["tokens"]["tokens"] == summary["corpus"]["tokens"]
    assert summary["dedup_clusters"]["removed_exact"] > 10
    for rank in range(4):  # each task's progress counter saw every document its writer wrote
        written = json.loads((clean / layout.READ_FILTER / "completions" / f"{rank:05d}").read_text())
        progress = json.loads((clean / layout.READ_FILTER / "progress" / f"{rank:05d}.json").read_text())
        assert progress["n"] == written["result"]["steps"][-1]["docs_out"] > 0, (rank, progress)
    assert summary["top_drop_reasons"] and "Top drop reasons" in (clean / layout.SUMMARY / "summary.md").read_text()
    print("\n" + (clean / layout.SUMMARY / "summary.md").read_text())
    excluded = collections.Counter(
        json.loads(line)["reason"] for _, path in layout.numbered_files(clean / layout.READ_FILTER / "excluded", ".jsonl.zst")
        for line in zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()).splitlines())
    filter_drops = {f"{s['name']}/{k}": v for s in summary["steps"] if s["name"] != "dedup" for k, v in s["dropped"].items()}
    assert excluded == filter_drops and sum(excluded.values()) > 500
    tokens_dropped = {s["name"]: s["tokens_dropped"] for s in summary["steps"]}
    assert tokens_dropped["dedup"] > 0 and tokens_dropped["gopher_repetition"] > 0 and tokens_dropped["write"] == 0

    tok = Tokenizer.from_file(str(clean / layout.TOKENIZER / "tokenizer.json"))
    first = next(read_docs(job.corpus_files(cfg, clean)[0][1]))
    assert tok.decode(dataset[0][:-1].tolist()) == first.text
    assert dataset[0][-1] == tok.token_to_id("<|endoftext|>")
    corpus = [d for _, path in job.corpus_files(cfg, clean) for d in read_docs(path)]
    zh = [(i, d) for i, d in enumerate(corpus) if d.metadata["lang"] == "zh"]
    assert len(zh) > 100  # Tang and Song poems made it through
    i, poem = zh[0]
    assert tok.decode(dataset[i][:-1].tolist()) == poem.text

    # Same job, but read_filter task 1 is SIGKILLed while writing, then the run is resumed.
    killed = tmp_path / "killed"
    stage_file = tmp_path / "stages.pkl"
    stage_file.write_bytes(pickle.dumps(stages))
    script = ("import pickle, sys; from puyu.launcher.stage import TaskContext; from pathlib import Path\n"
              "stage = pickle.load(open(sys.argv[1], 'rb'))[0]\n"
              "stage.fn(TaskContext(Path(sys.argv[2]), Path(sys.argv[2]) / stage.name, 1, stage.shards))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(stage_file), str(killed)])
    out_dir = killed / layout.READ_FILTER / "out"
    deadline = time.time() + 60
    while not list(out_dir.glob(".00001.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)
    assert proc.poll() is None, "task finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "00001.jsonl.zst").exists()  # nothing half-written under a final name
    assert list(out_dir.glob(".00001.*.tmp"))
    run_inline(stages, killed)
    assert not list(out_dir.glob(".00001.*.tmp"))
    clean_files, killed_files = data_files(clean), data_files(killed)
    assert clean_files.keys() == killed_files.keys()
    assert [k for k in clean_files if clean_files[k] != killed_files[k]] == []


def test_rerun_skips_finished_tasks(tmp_path):
    cfg = real_config()
    cfg.inputs = cfg.inputs[:1]
    cfg.inputs[0].max_docs = 400
    stages = job.build_data_stages(cfg)
    run_inline(stages, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    run_inline(stages, tmp_path)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert np.all([s.pending_ranks(tmp_path) == [] for s in stages])


def test_an_existing_tokenizer_is_loaded_not_trained(tmp_path):
    from puyu.data_pipeline import tokenize
    from puyu.launcher.stage import TaskContext

    source = tmp_path / "given.json"
    given = tokenize.train_tokenizer(["hello world 你好世界"] * 20, 300, 2, source)
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path="/unused")],
                          tokenizer=C.TokenizerConfig(path=str(source)))
    ctx = TaskContext(tmp_path / "run", tmp_path / "run" / layout.TOKENIZER)
    result = job.tokenizer_stage(ctx, cfg)
    assert result["source"] == str(source) and result["vocab_size"] == given.get_vocab_size()
    assert (ctx.stage_dir / "tokenizer.json").read_bytes() == source.read_bytes()


def test_a_tokenizer_without_end_of_document_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from puyu.launcher.stage import TaskContext

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.save(str(tmp_path / "bare.json"))
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path="/unused")],
                          tokenizer=C.TokenizerConfig(path=str(tmp_path / "bare.json")))
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token; add it or set tokenizer.append_eod=false"):
        job.tokenizer_stage(TaskContext(tmp_path / "run", tmp_path / "run" / layout.TOKENIZER), cfg)
