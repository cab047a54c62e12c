"""Peak memory per task does not grow with the input: every task of the data job at 1x, 4x and 16x input.

The input is distinct documents (1/16, 1/4 and all of the English, French and Spanish wiki summaries,
interleaved: 1,639 / 6,556 / 26,227 documents, 0.9 / 3.5 / 14 MB), so the per-duplicate terms the dedup
stages are allowed stay near zero and any growth is a per-document term. The slope from 4x to 16x (bytes per
added document) is compared with each task's documented per-document term; the slope from 1x to 4x is
printed too: bounded buffers fill there. One process imports everything and loads the language models
once, then forks a child per task with its free heap trimmed, so every child starts from the same
baseline; each child reports its own peak (VmHWM).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from puyu.data_pipeline import corpora

SIZES = (16, 4, 1)  # 1/16, 1/4 and all of the corpus: 1x, 4x, 16x
# The per-document terms a task is allowed, in bytes per document of its input (docs/benchmarks.md, dedup):
# the signatures task sorts each band's hashes (8 bytes) and indices (4) of its file in memory; a buckets
# task maps the signature rows (4 bytes per permutation) of the bucket members it verifies, which VmHWM
# counts. Every other task streams: its peak must stop growing once its bounded buffers are full (zstd
# windows, the 1 MiB copy buffer), which they are at 4x.
PER_DOC = {"minhash_signatures": 600, "minhash_buckets": 800}
NOISE = 2 << 20  # bytes: VmHWM's page granularity and the allocator's slack, seen up to ~1.1 MB

MEASURE = """
import ctypes, gc, itertools, json, os, sys
from pathlib import Path
from puyu.data_pipeline import config as C, corpora, job, language
from puyu.launcher.stage import TaskContext

def peak_kb(pid_status="/proc/self/status"):
    return int(next(line.split()[1] for line in open(pid_status) if line.startswith("VmHWM")))

libc = ctypes.CDLL("libc.so.6")
tmp, sizes = Path(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
by_lang = [[corpora.wiki_extract(a) for a in json.loads(corpora.wiki_summaries_file(lang).read_text()).values()]
           for lang in ("en-us", "fr-fr", "es-es")]
texts = [t for group in itertools.zip_longest(*by_lang) for t in group if t]  # the languages interleaved
lang_cfg = C.LanguageConfig(keep=["en", "fr", "es"], candidates=["en", "fr", "es", "de", "zh"])  # ~6x faster
language.identify("A sentence loads the models once, in the parent.", lang_cfg)   # than all 74 (language.py)
peaks = {}
for part in sizes:
    src = tmp / f"in{part}" / "wiki.jsonl"
    src.parent.mkdir()
    with open(src, "w") as fh:
        for i, text in enumerate(texts[: len(texts) // part]):
            fh.write(json.dumps({"id": str(i), "text": text}) + "\\n")
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path=str(src))], shards=1)
    cfg.filters.c4.enabled = False
    cfg.filters.language = lang_cfg
    cfg.tokenizer.vocab_size = 4000
    cfg.tokenizer.sample_bytes = 200_000  # below the 1x input: the tokenizer's bounded term is full at 1x
    cfg.output.parquet_row_group = 500  # below the 1x document count, for the same reason
    run_dir = tmp / f"run{part}"
    for stage in job.build_data_stages(cfg):
        for rank in range(stage.shards):
            gc.collect()
            libc.malloc_trim(0)  # the parent's free heap back to the system: a child's growth must show
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the task, then its own peak through the pipe; never back into the parent's loop
                try:
                    ctx = TaskContext(run_dir, run_dir / stage.name, rank, stage.shards)
                    ctx.mark_done(stage.fn(ctx))
                    os.write(write, str(peak_kb()).encode())
                finally:
                    os._exit(0)
            os.close(write)
            reported = os.read(read, 64)
            os.close(read)
            _, status = os.waitpid(pid, 0)
            assert status == 0 and reported, (stage.name, rank, status)
            by_part = peaks.setdefault(stage.name, {})
            by_part[part] = max(by_part.get(part, 0), int(reported))
peaks["documents"] = {part: len(texts) // part for part in sizes}
print("PEAKS", json.dumps(peaks))
"""


def test_peak_rss_does_not_grow_from_1x_to_4x_to_16x_input(tmp_path):
    try:
        for lang in ("en-us", "fr-fr", "es-es"):
            corpora.wiki_summaries_file(lang)
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), ",".join(map(str, SIZES))],
                         check=True, capture_output=True, text=True).stdout
    peaks = json.loads(out.split("PEAKS")[-1])
    docs = peaks.pop("documents")
    added = docs[str(SIZES[2])] - docs[str(SIZES[1])]  # documents from 4x to 16x
    print(f"\nstage                peak RSS MB at 1x / 4x / 16x input ({' / '.join(str(docs[str(p)]) for p in SIZES)} "
          "documents, 1 task), then bytes per added document from 1x to 4x and from 4x to 16x")
    grew = {}
    for name, by_part in peaks.items():
        one, four, sixteen = (by_part[str(p)] << 10 for p in SIZES)
        print(f"{name:20s} {one / 2**20:8.1f} {four / 2**20:8.1f} {sixteen / 2**20:8.1f}   "
              f"{(four - one) / (docs[str(SIZES[1])] - docs[str(SIZES[0])]):6.0f} {(sixteen - four) / added:6.0f}")
        if sixteen - four > NOISE + PER_DOC.get(name, 0) * added:
            grew[name] = f"+{(sixteen - four) / 2**20:.1f} MB for {added} more documents"
    assert not grew, f"peak memory grows with the input: {grew}"
