"""The data job's report: what every step took in and let out, why documents were dropped.

Built from the stages' completion markers (each holds the stats its task returned), so it costs
nothing to recompute and can be rewritten after any rerun: ``write_summary(run_dir, cfg)``.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Optional

from tokenizers import Tokenizer

from puyu.data_pipeline import dedup, layout
from puyu.data_pipeline.document import StepStats
from puyu.data_pipeline.tokenize import token_ids
from puyu.data_pipeline.writers import read_docs
from puyu.launcher.atomic import atomic_write_text
from puyu.launcher.stage import COMPLETIONS


def _results(run_dir: Path, stage: str) -> list[Any]:
    markers = sorted((run_dir / stage / COMPLETIONS).glob("[0-9]" * 5))
    return [json.loads(m.read_text())["result"] for m in markers]


def _merged_steps(step_lists: list[list[dict]]) -> list[StepStats]:
    merged: dict[str, StepStats] = {}
    for steps in step_lists:
        for data in steps:
            stats = StepStats.from_dict(data)
            if stats.name in merged:
                merged[stats.name].merge(stats)
            else:
                merged[stats.name] = stats
    return list(merged.values())


def dropped_tokens(run_dir: Path, tok: Tokenizer, numbers: list[int]) -> dict[str, int]:
    """Tokens (no end-of-document tokens) of the documents each step dropped, for some corpus files.

    Filter drops are read back from the exclusion files, as the documents were when dropped;
    dedup drops from the filtered corpus at the indices the clusters stage removed. The tokenize
    stage calls this for its own files, so the cost is spread over the array.
    """
    counts: collections.Counter = collections.Counter()
    for number in numbers:
        excluded = run_dir / layout.READ_FILTER / "excluded" / f"{number:05d}.jsonl.zst"
        if excluded.exists():
            steps: collections.deque = collections.deque()  # at most one batch ahead of the token ids

            def texts():
                for doc in read_docs(excluded):
                    steps.append(doc.metadata["dropped_by"])
                    yield doc.text

            for ids in token_ids(tok, texts()):
                counts[steps.popleft()] += len(ids)
        removed = dedup.load_removals(run_dir / layout.CLUSTERS / "remove" / f"{number:05d}.npy")
        if removed:
            path = run_dir / layout.READ_FILTER / "out" / f"{number:05d}.jsonl.zst"
            texts = (d.text for i, d in enumerate(read_docs(path)) if i in removed)
            counts["dedup"] += sum(len(ids) for ids in token_ids(tok, texts))
    return dict(counts)


def _tokens_dropped(stats: StepStats, counts: Optional[collections.Counter]) -> Optional[int]:
    """None where unknown: not counted, or the step dropped documents but wrote no exclusions."""
    if counts is None:
        return None
    return counts.get(stats.name, 0 if not sum(stats.dropped.values()) else None)


def build_summary(run_dir: Path, packed: Optional[dict] = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    lists = [r["steps"] for r in _results(run_dir, layout.READ_FILTER)]
    steps = _merged_steps(lists)
    dedup_lists = [file_steps for r in _results(run_dir, layout.DEDUP) for file_steps in r.values()]
    steps += [s for s in _merged_steps(dedup_lists) if s.name == "dedup"]
    clusters = (_results(run_dir, layout.CLUSTERS) or [None])[0]
    tokenized = _results(run_dir, layout.TOKENIZE)
    token_files = [f for r in tokenized for f in r["files"].values()]
    token_drops: Optional[collections.Counter] = None
    if tokenized and all(r["dropped_tokens"] is not None for r in tokenized):
        token_drops = sum((collections.Counter(r["dropped_tokens"]) for r in tokenized), collections.Counter())
    tokens = {"documents": sum(f["documents"] for f in token_files), "tokens": sum(f["tokens"] for f in token_files)}
    reasons = collections.Counter({f"{s.name}/{k}": v for s in steps for k, v in s.dropped.items()})
    errors = [m for s in steps for m in s.error_messages]
    docs_in = steps[0].docs_out if steps else 0  # documents the readers produced
    docs_out = tokens["documents"]
    return {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "steps": [{**s.to_dict(), "tokens_dropped": _tokens_dropped(s, token_drops)} for s in steps],
        "tokens": tokens,
        "corpus": packed,
        "dedup_clusters": clusters,
        "top_drop_reasons": reasons.most_common(10),
        "input_errors": sum(s.errors for s in steps),
        "input_error_examples": errors[:20],
    }


def to_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Data job summary", "",
             f"Documents: {summary['docs_in']} read, {summary['docs_out']} in the corpus; "
             f"tokens: {summary['tokens']['tokens']}.", "",
             "| step | docs in | docs out | dropped | tokens dropped | MB in | MB out | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary["steps"]:
        tokens = "" if s["tokens_dropped"] is None else s["tokens_dropped"]
        lines.append(f"| {s['name']} | {s['docs_in']} | {s['docs_out']} | {sum(s['dropped'].values())} | {tokens} | "
                     f"{s['bytes_in'] / 1e6:.2f} | {s['bytes_out'] / 1e6:.2f} | {s['seconds']:.1f} |")
    tok = summary["tokens"]
    lines.append(f"| tokenize | {tok['documents']} | {tok['documents']} | 0 | | | {tok['tokens']} tokens out | |")
    if summary["dedup_clusters"]:
        c = summary["dedup_clusters"]
        lines += ["", f"Dedup: {c['clusters']} duplicate clusters (largest {c['largest_cluster']}), "
                      f"{c['removed_exact']} exact and {c['removed_near']} near duplicates removed."]
    lines += ["", "## Top drop reasons", "", "| reason | documents |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in summary["top_drop_reasons"]]
    lines += ["", f"## Input errors: {summary['input_errors']}", ""]
    lines += [f"- `{message}`" for message in summary["input_error_examples"]]
    return "\n".join(lines) + "\n"


def write_summary(run_dir: Path, cfg: Any = None, packed: Optional[dict] = None) -> dict[str, Any]:
    """Write ``summary/summary.json`` and ``summary/summary.md`` under ``run_dir``; return the dict."""
    summary = build_summary(Path(run_dir), packed)
    out = Path(run_dir) / layout.SUMMARY
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "summary.md", to_markdown(summary))
    return summary
