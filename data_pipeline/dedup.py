"""Exact and MinHash-LSH near-dedup as four stages over array tasks.

1. signatures (per corpus file): MinHash rows -> ``sigs/NNNNN.u32``; for every band the sorted
   (band hash, doc index) pairs -> row k of ``bands/NNNNN.npy``; the last band, ``exact``, holds a
   content hash.
2. buckets (bands round-robin over ranks): streams each band's sorted files through a k-way merge;
   documents sharing a band hash become candidate pairs, kept if the signatures agree on at least
   ``threshold`` of their rows (``verify``) -> ``pairs/NNNNN.npy``.
3. clusters (one task): union-find over all pairs; the document with the smallest key of each
   cluster stays, the others go to ``remove/NNNNN.npy`` as exact or near duplicates.
4. filter (per corpus file): copies the file minus its removed documents.

A document's key is ``file << 32 | index in file``; keeping the smallest key makes the result
independent of task order, so reruns are byte-identical.
"""
from __future__ import annotations

import heapq
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from puyu.data_pipeline import minhash
from puyu.data_pipeline.config import DedupConfig
from puyu.data_pipeline.document import Document
from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.errors import ConfigError

log = logging.getLogger("puyu.data_pipeline.dedup")

BAND_DTYPE = np.dtype([("hash", "<u8"), ("idx", "<u4")])
PAIR_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8"), ("exact", "u1")])
REMOVE_DTYPE = np.dtype([("idx", "<u4"), ("exact", "u1")])
EXACT_BAND = "exact"
BATCH = 2048


def lsh_params(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.bands and cfg.rows:
        if cfg.bands * cfg.rows > cfg.num_perm:
            raise ConfigError(f"dedup: bands*rows = {cfg.bands * cfg.rows} exceeds num_perm = {cfg.num_perm}")
        return cfg.bands, cfg.rows
    return minhash.optimal_bands(cfg.threshold, cfg.num_perm)


def band_names(cfg: DedupConfig) -> list[str]:
    names = [f"{k:03d}" for k in range(lsh_params(cfg)[0])] if cfg.near else []
    return names + ([EXACT_BAND] if cfg.exact else [])


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_signatures(docs: Iterator[Document], out_dir: Path, number: int, cfg: DedupConfig) -> dict:
    """Stage 1 for one corpus file: signature rows streamed to disk, band files sorted at the end."""
    bands, rows = lsh_params(cfg)
    band_cols: list[np.ndarray] = []
    exact_col: list[np.ndarray] = []
    n_docs = 0
    with atomic_open(out_dir / "sigs" / f"{number:05d}.u32", "wb") as sig_fh:
        batch: list[str] = []

        def flush() -> None:
            encoded = minhash.EncodedBatch(batch)
            sigs = encoded.signatures(cfg.num_perm, cfg.seed, cfg.ngram)
            sig_fh.write(sigs.tobytes())
            if cfg.near:
                band_cols.append(minhash.band_hashes(sigs, bands, rows))
            if cfg.exact:
                exact_col.append(encoded.content_hashes())
            batch.clear()

        for doc in docs:
            batch.append(doc.text)
            n_docs += 1
            if len(batch) == BATCH:
                flush()
        if batch:
            flush()
    columns = []
    if cfg.near:
        matrix = np.concatenate(band_cols) if band_cols else np.empty((0, bands), np.uint64)
        columns += [matrix[:, k] for k in range(bands)]
    if cfg.exact:
        columns.append(np.concatenate(exact_col) if exact_col else np.empty(0, np.uint64))
    table = np.empty((len(columns), n_docs), dtype=BAND_DTYPE)  # row k: band_names(cfg)[k], sorted
    for k, column in enumerate(columns):
        order = np.argsort(column, kind="stable")  # stable: equal hashes keep index order
        table[k]["hash"], table[k]["idx"] = column[order], order.astype(np.uint32)
    _save_npy(out_dir / "bands" / f"{number:05d}.npy", table)
    log.info("signatures: file %05d, %d docs, %d bands x %d rows", number, n_docs, bands, rows)
    return {"docs": n_docs, "bands": bands, "rows": rows}


def _band_stream(path: Path, row: int, number: int, chunk: int = 65536) -> Iterator[tuple[int, int]]:
    table = np.load(path, mmap_mode="r")[row]
    base = number << 32
    for start in range(0, len(table), chunk):
        part = table[start:start + chunk]
        yield from zip(part["hash"].tolist(), (base + part["idx"].astype(np.uint64)).tolist())


class SignatureStore:
    """Memory-mapped signature rows of all corpus files, for verifying candidate pairs."""

    def __init__(self, sig_dir: Path, num_perm: int) -> None:
        self.sig_dir, self.num_perm, self._maps = sig_dir, num_perm, {}

    def row(self, key: int) -> np.ndarray:
        number = key >> 32
        if number not in self._maps:
            path = self.sig_dir / f"{number:05d}.u32"
            self._maps[number] = np.memmap(path, dtype=np.uint32, mode="r").reshape(-1, self.num_perm)
        return self._maps[number][key & 0xFFFFFFFF]

    def jaccard(self, a: int, b: int) -> float:
        return float(np.count_nonzero(self.row(a) == self.row(b))) / self.num_perm


def find_pairs(sig_stage_dir: Path, numbers: list[int], band: str, cfg: DedupConfig,
               store: SignatureStore) -> tuple[list[tuple[int, int, int]], dict]:
    """Stage 2 for one band: merge the band's sorted files, pair each bucket member with its first."""
    row = band_names(cfg).index(band)
    streams = [_band_stream(sig_stage_dir / "bands" / f"{n:05d}.npy", row, n) for n in numbers]
    exact = band == EXACT_BAND
    pairs, candidates, rejected = [], 0, 0
    current, first = None, None
    for hash_value, key in heapq.merge(*streams):
        if hash_value != current:
            current, first = hash_value, key
            continue
        candidates += 1
        if not exact and cfg.verify and store.jaccard(first, key) < cfg.threshold:
            rejected += 1
            continue
        pairs.append((first, key, int(exact)))
    return pairs, {"candidates": candidates, "rejected": rejected, "pairs": len(pairs)}


def save_pairs(path: Path, pairs: list[tuple[int, int, int]]) -> None:
    _save_npy(path, np.array(sorted(set(pairs)), dtype=PAIR_DTYPE) if pairs else np.empty(0, PAIR_DTYPE))


class UnionFind:
    """Union-find that keeps the smallest key as each set's root (order-independent result)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def cluster(pair_files: list[Path], out_dir: Path, numbers: list[int]) -> dict:
    """Stage 3: components of the pair graph; all but the smallest key of each are removed."""
    everything, exact_only = UnionFind(), UnionFind()
    for path in pair_files:
        for a, b, exact in np.load(path).tolist():
            everything.union(a, b)
            if exact:
                exact_only.union(a, b)
    removed: dict[int, list[tuple[int, int]]] = {n: [] for n in numbers}
    sizes: dict[int, int] = {}
    for key in list(everything.parent):
        root = everything.find(key)
        sizes[root] = sizes.get(root, 1) + (key != root)
        if key != root:
            is_exact = exact_only.find(key) == exact_only.find(root)
            removed.setdefault(key >> 32, []).append((key & 0xFFFFFFFF, int(is_exact)))
    for number, items in removed.items():
        _save_npy(out_dir / "remove" / f"{number:05d}.npy", np.array(sorted(items), dtype=REMOVE_DTYPE))
    n_exact = sum(e for items in removed.values() for _, e in items)
    n_removed = sum(len(items) for items in removed.values())
    stats = {"clusters": len(sizes), "largest_cluster": max(sizes.values(), default=0),
             "removed": n_removed, "removed_exact": n_exact, "removed_near": n_removed - n_exact}
    atomic_write_text(out_dir / "clusters.json", json.dumps(stats, sort_keys=True, indent=1) + "\n")
    return stats


def load_removals(path: Path) -> dict[int, int]:
    """index in file -> 1 if an exact duplicate, 0 if a near duplicate."""
    if not path.exists():
        return {}
    return {int(i): int(e) for i, e in np.load(path).tolist()}
