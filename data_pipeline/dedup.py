"""Exact and MinHash-LSH near-dedup as four stages over array tasks, any number of tasks each.

1. signatures (per corpus file): MinHash rows -> ``sigs/NNNNN.u32``; for every band the band hashes
   sorted, with each one's document index -> row k of ``bands/NNNNN.hash.npy`` / ``.idx.npy``; the last
   band, ``exact``, holds a content hash. Each document's sorted shingle hashes -> ``shingles/``, for
   verifying candidates whose signature estimate is too close to the threshold to decide.
2. buckets: the work is split by band *and* by hash range (``bands x parts`` units, ``parts`` enough
   for every task to get one, as datatrove's ``num_buckets x k``); a unit binary-searches its range in
   every file's sorted row, sorts the slices together with numpy and pairs the members of each bucket
   whose Jaccard reaches ``threshold`` (:func:`lsh.bucket_pairs`, :class:`_Verifier`) ->
   ``pairs/NNNNN.npy``. A unit holds at most :data:`CHUNK` entries at a time (a bigger one is cut into
   narrower hash ranges), so a task's memory does not grow with the corpus.
3. clusters (one task): union-find over the pairs as arrays (:mod:`puyu.data_pipeline.lsh`), memory per
   duplicate; each component keeps one document, the others go to ``remove/NNNNN.npy``.
4. filter (per corpus file): copies the file minus its removed documents.

A document's key is ``file << 32 | index in file``; keeping the smallest key makes the result
independent of task order, so reruns are byte-identical. ``dedup.index`` adds the signature folders of
earlier corpora: their documents take part in the buckets with :data:`lsh.INDEX_BIT` set in their keys,
are kept over any document of this corpus, and are never removed or paired with each other.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from puyu.data_pipeline import layout, lsh, minhash
from puyu.data_pipeline.config import DedupConfig
from puyu.data_pipeline.document import Document
from puyu.launcher.atomic import atomic_open, atomic_write_text
from puyu.launcher.errors import ConfigError

log = logging.getLogger("puyu.data_pipeline.dedup")

PAIR_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8"), ("exact", "u1")])
REMOVE_DTYPE = np.dtype([("idx", "<u4"), ("exact", "u1")])
EXACT_BAND = "exact"
BATCH = 2048
CHUNK = 1 << 19  # band entries a buckets task sorts at once (8 MB of hashes and keys, <= 0.25 GB of member rows)
MAX_LEADERS = 64  # per bucket: the most distinct documents a member is verified against
VERIFY_BATCH = 65536  # candidate pairs whose signature rows are compared at once (2 x 29 MB at 112 rows)
EXACT_BATCH = 4096  # candidate pairs whose shingle sets are compared at once
PARAMS = "params.json"  # the signature settings of a signatures folder (what an index must share)
INDEX_SHIFT = 49  # an index document's key: INDEX_BIT | index number << 49 | file << 32 | index in file
MAX_INDEX_FILES = 1 << (INDEX_SHIFT - 32)
HASH_SPACE = 1 << 64


def lsh_params(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows): the configured ones, else datasketch's optimum for the threshold.

    With ``verify`` a false candidate costs one signature comparison while a missed pair is a duplicate
    kept, so the optimum weighs false negatives 0.98 (17 x 7 at 0.8 of 128: 98% of pairs at J = 0.8 meet
    in a band); the even weights of datasketch's default (9 x 13) let 60% of them through.
    """
    if cfg.bands and cfg.rows:
        if cfg.bands * cfg.rows > cfg.num_perm:
            raise ConfigError(f"dedup: bands*rows = {cfg.bands * cfg.rows} exceeds num_perm = {cfg.num_perm}")
        return cfg.bands, cfg.rows
    return minhash.optimal_bands(cfg.threshold, cfg.num_perm, *((0.02, 0.98) if cfg.verify else (0.5, 0.5)))


def band_names(cfg: DedupConfig) -> list[str]:
    names = [f"{k:03d}" for k in range(lsh_params(cfg)[0])] if cfg.near else []
    return names + ([EXACT_BAND] if cfg.exact else [])


def keeps_shingles(cfg: DedupConfig) -> bool:
    """Whether candidates near the threshold are checked on shingle sets, which stage 1 then writes."""
    return cfg.near and cfg.verify and cfg.verify_margin > 0


def signature_params(cfg: DedupConfig) -> dict:
    """What decides a signatures folder's contents: two folders are comparable when these agree."""
    bands, rows = lsh_params(cfg)
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "ngram": cfg.ngram, "bands": bands, "rows": rows,
            "band_names": band_names(cfg)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_signatures(docs: Iterator[Document], out_dir: Path, number: int, cfg: DedupConfig) -> dict:
    """Stage 1 for one corpus file: signature rows streamed to disk, band rows sorted at the end."""
    bands, rows = lsh_params(cfg)
    band_cols: list[np.ndarray] = []
    exact_col: list[np.ndarray] = []
    n_docs = 0
    bounds: list[np.ndarray] = [np.zeros(1, np.int64)]
    sets = atomic_open(out_dir / "shingles" / f"{number:05d}.u32", "wb") if keeps_shingles(cfg) \
        else contextlib.nullcontext()
    with atomic_open(out_dir / "sigs" / f"{number:05d}.u32", "wb") as sig_fh, sets as set_fh:
        batch: list[str] = []

        def flush() -> None:
            encoded = minhash.EncodedBatch(batch)
            sigs = encoded.signatures(cfg.num_perm, cfg.seed, cfg.ngram)
            sig_fh.write(sigs.tobytes())
            if keeps_shingles(cfg):
                values, ends = encoded.shingle_sets(cfg.ngram)
                set_fh.write(values.tobytes())
                bounds.append(ends[1:] + bounds[-1][-1])
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
    hashes = np.empty((len(columns), n_docs), dtype=np.uint64)  # row k: band_names(cfg)[k], sorted
    indices = np.empty((len(columns), n_docs), dtype=np.uint32)
    for k, column in enumerate(columns):
        order = np.argsort(column, kind="stable")  # stable: equal hashes keep index order
        hashes[k], indices[k] = column[order], order
    if keeps_shingles(cfg):
        _save_npy(out_dir / "shingles" / f"{number:05d}.bounds.npy", np.concatenate(bounds))
    _save_npy(out_dir / "bands" / f"{number:05d}.idx.npy", indices)
    _save_npy(out_dir / "bands" / f"{number:05d}.hash.npy", hashes)
    params = json.dumps(signature_params(cfg), sort_keys=True) + "\n"
    if not (out_dir / PARAMS).exists() or (out_dir / PARAMS).read_text() != params:
        atomic_write_text(out_dir / PARAMS, params)
    log.info("signatures: file %05d, %d docs, %d bands x %d rows", number, n_docs, bands, rows)
    return {"docs": n_docs, "bands": bands, "rows": rows}


@dataclasses.dataclass(frozen=True)
class SignatureSource:
    """A signatures folder the buckets stage reads: this run's, or an earlier corpus's (an index)."""

    folder: Path
    key_base: int  # or-ed into ``file << 32 | index``: 0 for this corpus
    numbers: tuple[int, ...]
    rows: dict  # band name -> row of that band in the folder's band files


def index_folder(path: str) -> Path:
    """``dedup.index`` entries may name an earlier run or its signatures folder."""
    folder = Path(path)
    return folder / layout.SIGNATURES if (folder / layout.SIGNATURES / PARAMS).exists() else folder


def check_index(cfg: DedupConfig) -> None:
    """Every ``dedup.index`` folder exists and was made with this config's signature settings."""
    mine = signature_params(cfg)
    for j, path in enumerate(cfg.index):
        params_file = index_folder(path) / PARAMS
        if not params_file.is_file():
            raise ConfigError(f"data job: dedup.index[{j}] {path!r} holds no {PARAMS} (not a finished "
                              f"{layout.SIGNATURES} folder or run)")
        theirs = json.loads(params_file.read_text())
        differ = [k for k in ("num_perm", "seed", "ngram", "bands", "rows") if theirs.get(k) != mine[k]]
        if differ:
            raise ConfigError(f"data job: dedup.index[{j}] {path!r} was made with other "
                              + ", ".join(f"{k} ({theirs.get(k)} vs {mine[k]})" for k in differ))
    if len(cfg.index) >= 1 << (63 - INDEX_SHIFT):
        raise ConfigError(f"data job: dedup.index lists {len(cfg.index)} folders; at most {(1 << 14) - 1}")


def signature_sources(sig_dir: Path, cfg: DedupConfig) -> list[SignatureSource]:
    """Index folders first (so within a bucket their documents lead), then this run's signatures."""
    sources = []
    for j, path in enumerate(cfg.index):
        folder = index_folder(path)
        names = json.loads((folder / PARAMS).read_text())["band_names"]
        numbers = tuple(n for n, _ in layout.numbered_files(folder / "sigs", ".u32"))
        if numbers and numbers[-1] >= MAX_INDEX_FILES:
            raise ConfigError(f"data job: dedup.index[{j}] has file number {numbers[-1]}; at most {MAX_INDEX_FILES - 1}")
        sources.append(SignatureSource(folder, int(lsh.INDEX_BIT) | ((j + 1) << INDEX_SHIFT), numbers,
                                       {name: k for k, name in enumerate(names)}))
    numbers = tuple(n for n, _ in layout.numbered_files(sig_dir / "sigs", ".u32"))
    sources.append(SignatureSource(sig_dir, 0, numbers, {name: k for k, name in enumerate(band_names(cfg))}))
    return sources


class SignatureStore:
    """Memory-mapped signature rows of every source, fetched by key for verifying a bucket's members."""

    def __init__(self, sources: list[SignatureSource], num_perm: int) -> None:
        self.num_perm = num_perm
        self.paths = {(s.key_base >> 32) | n: s.folder / "sigs" / f"{n:05d}.u32" for s in sources for n in s.numbers}
        self._maps: dict[int, np.ndarray] = {}

    def _map(self, high: int) -> np.ndarray:
        if high not in self._maps:
            self._maps[high] = np.memmap(self.paths[high], dtype=np.uint32, mode="r").reshape(-1, self.num_perm)
        return self._maps[high]

    def _by_file(self, keys: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(file, positions in ``keys``, indices in that file) for each file the keys fall in."""
        high = keys >> np.uint64(32)
        for h in np.unique(high):
            where = np.flatnonzero(high == h)
            yield int(h), where, (keys[where] & np.uint64(0xFFFFFFFF)).astype(np.int64)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty((len(keys), self.num_perm), dtype=np.uint32)
        for high, where, local in self._by_file(keys):
            out[where] = self._map(high)[local]
        return out

    def shingle_sets(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, bounds) of the documents' sorted shingle hashes, in the order of ``keys``."""
        starts, sizes, parts = np.empty(len(keys), np.int64), np.empty(len(keys), np.int64), {}
        for high, where, local in self._by_file(keys):
            path = self.paths[high]
            bounds = np.load(path.parent.parent / "shingles" / f"{path.stem}.bounds.npy", mmap_mode="r")
            starts[where], sizes[where] = bounds[local], bounds[local + 1] - bounds[local]
            parts[high] = (where, np.memmap(path.parent.parent / "shingles" / path.name, dtype=np.uint32, mode="r"))
        out_bounds = np.zeros(len(keys) + 1, np.int64)
        np.cumsum(sizes, out=out_bounds[1:])
        values = np.empty(out_bounds[-1], np.uint32)
        for where, mapped in parts.values():  # each file's documents gathered in one fancy index
            values[_ranges(out_bounds[where], sizes[where])] = mapped[_ranges(starts[where], sizes[where])]
        return values, out_bounds


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``arange(start, start + length)`` for each pair, concatenated, without a Python loop."""
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))


def bucket_units(cfg: DedupConfig, world_size: int) -> list[tuple[str, int, int]]:
    """(band, part, parts): each band cut into enough hash ranges that every task has a unit."""
    names = band_names(cfg)
    parts = max(1, math.ceil(world_size / len(names)))
    return [(band, part, parts) for band in names for part in range(parts)]


def _hash_bound(value: int, row: np.ndarray) -> int:
    return len(row) if value >= HASH_SPACE else int(np.searchsorted(row, np.uint64(value)))


def _slices(sources: list[SignatureSource], band: str, lo: int, hi: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per file of every source: (hashes, indices, key base) of its sorted band row within [lo, hi)."""
    out = []
    for src in sources:
        if band not in src.rows:
            continue
        row = src.rows[band]
        for n in src.numbers:
            hashes = np.load(src.folder / "bands" / f"{n:05d}.hash.npy", mmap_mode="r")[row]
            start, end = _hash_bound(lo, hashes), _hash_bound(hi, hashes)
            if end > start:
                idx = np.load(src.folder / "bands" / f"{n:05d}.idx.npy", mmap_mode="r")[row]
                out.append((hashes[start:end], idx[start:end], src.key_base | (n << 32)))
    return out


def _everything(leaders: np.ndarray, members: np.ndarray) -> np.ndarray:
    return np.ones(len(members), dtype=bool)


class _Verifier:
    """Accepts a (leader, member) pair whose Jaccard reaches the threshold: by the signature estimate when
    it is clear by more than ``verify_margin`` (about 3 standard errors at 128 rows), else by the exact
    Jaccard of the two shingle sets, so no pair is kept or lost on the estimate's noise near the threshold."""

    def __init__(self, keys: np.ndarray, store: "SignatureStore", cfg: DedupConfig, stats: dict) -> None:
        self.keys, self.store, self.cfg, self.stats = keys, store, cfg, stats
        self.sigs = store.rows(keys)

    def __call__(self, leaders: np.ndarray, members: np.ndarray) -> np.ndarray:
        estimate = np.empty(len(members))
        for start in range(0, len(members), VERIFY_BATCH):  # batches: two row gathers at a time, not per member
            part = slice(start, start + VERIFY_BATCH)
            estimate[part] = np.count_nonzero(self.sigs[leaders[part]] == self.sigs[members[part]], axis=1)
        estimate /= self.cfg.num_perm
        accept = estimate >= self.cfg.threshold
        unsure = np.flatnonzero(np.abs(estimate - self.cfg.threshold) < self.cfg.verify_margin)
        for start in range(0, len(unsure), EXACT_BATCH):
            part = unsure[start:start + EXACT_BATCH]
            exact = lsh.set_jaccard(*self.store.shingle_sets(self.keys[leaders[part]]),
                                    *self.store.shingle_sets(self.keys[members[part]]))
            accept[part] = exact >= self.cfg.threshold
        self.stats["exact_checks"] += len(unsure)
        return accept


def unit_pairs(sources: list[SignatureSource], unit: tuple[str, int, int], cfg: DedupConfig,
               store: SignatureStore) -> tuple[np.ndarray, dict]:
    """Stage 2 for one unit (band, hash range): the verified pairs of its buckets."""
    band, part, parts = unit
    lo, hi = part * HASH_SPACE // parts, (part + 1) * HASH_SPACE // parts
    total = sum(len(h) for h, _, _ in _slices(sources, band, lo, hi))
    pieces = max(1, math.ceil(total / CHUNK))
    exact = band == EXACT_BAND
    found, stats = [], {"entries": total, "candidates": 0, "rejected": 0, "exact_checks": 0}
    for piece in range(pieces):
        slices = _slices(sources, band, lo + (hi - lo) * piece // pieces, lo + (hi - lo) * (piece + 1) // pieces)
        if not slices:
            continue
        hashes = np.concatenate([h for h, _, _ in slices])
        keys = np.concatenate([idx.astype(np.uint64) | np.uint64(base) for _, idx, base in slices])
        order = np.argsort(hashes, kind="stable")  # ties keep source/file/index order: index documents lead
        hashes, keys = hashes[order], keys[order]
        repeat = hashes[1:] == hashes[:-1]
        member = np.zeros(len(hashes), dtype=bool)
        member[1:] |= repeat
        member[:-1] |= repeat
        hashes, keys = hashes[member], keys[member]
        stats["candidates"] += int(np.count_nonzero(repeat))
        accept = _everything if exact or not cfg.verify else _Verifier(keys, store, cfg, stats)
        a, b, unmatched = lsh.bucket_pairs(hashes, keys, accept, MAX_LEADERS)
        stats["rejected"] += int(unmatched)
        pairs = np.empty(len(a), dtype=PAIR_DTYPE)
        pairs["a"], pairs["b"], pairs["exact"] = a, b, exact
        found.append(pairs)
    pairs = np.concatenate(found) if found else np.empty(0, PAIR_DTYPE)
    stats["pairs"] = len(pairs)
    return pairs, stats


def save_pairs(path: Path, pairs: list[np.ndarray]) -> None:
    _save_npy(path, np.unique(np.concatenate(pairs)) if pairs else np.empty(0, PAIR_DTYPE))


def cluster(pair_files: list[Path], out_dir: Path, numbers: list[int]) -> dict:
    """Stage 3: components of the pair graph; every component keeps one document (see :func:`lsh.dense_ids`)."""
    pairs = np.concatenate([np.load(p) for p in pair_files]) if pair_files else np.empty(0, PAIR_DTYPE)
    keys, left, right = lsh.dense_ids(pairs["a"], pairs["b"])
    roots = lsh.union_roots(len(keys), left, right)
    exact = pairs["exact"].astype(bool)
    exact_roots = lsh.union_roots(len(keys), left[exact], right[exact])
    removed = (roots != np.arange(len(keys))) & ((keys & lsh.INDEX_BIT) == 0)
    removed_exact = removed & (exact_roots == exact_roots[roots])
    by_index = removed & ((keys[roots] & lsh.INDEX_BIT) != 0)
    files = (keys[removed] >> np.uint64(32)).astype(np.int64)  # ascending: this corpus's keys are in key order
    local = (keys[removed] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    flags = removed_exact[removed]
    for number in numbers:
        lo, hi = np.searchsorted(files, number), np.searchsorted(files, number, side="right")
        out = np.empty(hi - lo, dtype=REMOVE_DTYPE)
        out["idx"], out["exact"] = local[lo:hi], flags[lo:hi]
        _save_npy(out_dir / "remove" / f"{number:05d}.npy", out)
    sizes = np.bincount(roots) if len(keys) else np.zeros(0, np.int64)
    n_removed, n_exact = int(np.count_nonzero(removed)), int(np.count_nonzero(removed_exact))
    stats = {"clusters": int(np.count_nonzero(sizes)), "largest_cluster": int(sizes.max(initial=0)),
             "removed": n_removed, "removed_exact": n_exact, "removed_near": n_removed - n_exact,
             "removed_by_index": int(np.count_nonzero(by_index))}
    atomic_write_text(out_dir / "clusters.json", json.dumps(stats, sort_keys=True, indent=1) + "\n")
    return stats


def load_removals(path: Path) -> dict[int, int]:
    """index in file -> 1 if an exact duplicate, 0 if a near duplicate."""
    if not path.exists():
        return {}
    return {int(i): int(e) for i, e in np.load(path).tolist()}
