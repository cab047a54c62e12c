"""Ground truth for the near-dedup quality tests: exact Jaccard over all pairs, and the clusters a run made."""
from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
from scipy import sparse

from puyu.data_pipeline import layout, lsh, minhash
from puyu.data_pipeline.document import Document
from puyu.data_pipeline.writers import read_docs


def filtered_docs(run_dir: Path) -> list[tuple[int, Document]]:
    """(key, document) of every document the read_filter stage kept, keyed as the dedup stages key them."""
    return [((n << 32) | i, d) for n, p in layout.numbered_files(run_dir / layout.READ_FILTER / "out", ".jsonl.zst")
            for i, d in enumerate(read_docs(p))]


def true_pairs(texts: list[str], ngram: int, threshold: float) -> set[tuple[int, int]]:
    """Positions ``(a, b)``, a < b, of the texts whose shingle sets have Jaccard >= threshold (sparse product)."""
    shingle_sets = [set(minhash.shingles(text, ngram)) for text in texts]
    vocab: dict[bytes, int] = {}
    rows, cols = zip(*[(j, vocab.setdefault(s, len(vocab))) for j, sh in enumerate(shingle_sets) for s in sh])
    incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
    shared = (incidence @ incidence.T).tocoo()
    sizes = np.array([len(s) for s in shingle_sets])
    jaccard = shared.data / (sizes[shared.row] + sizes[shared.col] - shared.data)
    keep = (shared.row < shared.col) & (jaccard >= threshold)
    return set(zip(shared.row[keep].tolist(), shared.col[keep].tolist()))


def predicted_clusters(run_dir: Path, keys: list[int]) -> list[list[int]]:
    """The components of the buckets stage's pairs, as lists of positions into ``keys``."""
    pairs = np.concatenate([np.load(p) for _, p in layout.numbered_files(run_dir / layout.BUCKETS / "pairs", ".npy")])
    ids, left, right = lsh.dense_ids(pairs["a"], pairs["b"])
    root_of = dict(zip(ids.tolist(), ids[lsh.union_roots(len(ids), left, right)].tolist()))
    clusters = collections.defaultdict(list)
    for position, key in enumerate(keys):
        clusters[root_of.get(key, key)].append(position)
    return list(clusters.values())


def precision_recall(clusters: list[list[int]], truth: set) -> tuple[float, float, set]:
    """Of 'same cluster' pairs against the true pairs; also the predicted pairs."""
    predicted = {pair for members in clusters for pair in itertools.combinations(sorted(members), 2)}
    hits = len(predicted & truth)
    return hits / max(len(predicted), 1), hits / max(len(truth), 1), predicted
