"""The array kernels of the MinHash buckets and clusters stages: bucket pairs (numpy) and union-find (numba).

Documents are 64-bit keys (``file << 32 | index in file``; a document of an earlier corpus's index has
:data:`INDEX_BIT` set). Both kernels work on flat numpy arrays so a stage holds a few bytes per
candidate or per duplicate, never a Python object per document, and never an array sized by the corpus.
"""
from __future__ import annotations

from typing import Callable

import numba
import numpy as np

INDEX_BIT = np.uint64(1 << 63)


def bucket_pairs(hashes: np.ndarray, keys: np.ndarray, accept: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 max_leaders: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs ``(leader, member)`` of each run of equal ``hashes`` (sorted), and how many members found no leader.

    A run is one LSH bucket. Its first member leads; each later member is compared with the run's leaders
    in order and paired with the first one ``accept`` (positions of leaders, positions of members -> mask)
    takes, else it leads too (up to ``max_leaders``, which bounds the work of a huge bucket of unrelated
    documents). Comparing with every leader, not only the first, keeps a pair of duplicates that landed
    in a bucket with an unrelated first member. Two index documents are never paired: only this
    corpus's documents can be removed.

    In rounds over all buckets at once (round k compares the members left with each bucket's k-th
    leader), so it is a few numpy passes: a buckets task needs no compiled code, and starts faster.
    """
    run = np.cumsum(np.r_[False, hashes[1:] != hashes[:-1]]) if len(hashes) else np.zeros(0, np.int64)
    pending = np.ones(len(hashes), dtype=bool)
    found_a, found_b, leaders_total = [], [], 0
    for _ in range(max_leaders):
        idx = np.flatnonzero(pending)
        if not len(idx):
            break
        first = np.r_[True, run[idx[1:]] != run[idx[:-1]]]
        leader_of = idx[first][np.cumsum(first) - 1]
        members, their_leader = idx[~first], leader_of[~first]
        ok = accept(their_leader, members)
        a, b = keys[their_leader[ok]], keys[members[ok]]
        keep = ((a & INDEX_BIT) == 0) | ((b & INDEX_BIT) == 0)
        found_a.append(a[keep])
        found_b.append(b[keep])
        leaders_total += int(np.count_nonzero(first))
        pending[idx[first]] = False
        pending[members[ok]] = False
    runs = int(run[-1]) + 1 if len(run) else 0
    unmatched = leaders_total - runs + int(np.count_nonzero(pending))
    empty = np.zeros(0, np.uint64)
    return np.concatenate(found_a or [empty]), np.concatenate(found_b or [empty]), unmatched


def set_jaccard(values_a: np.ndarray, bounds_a: np.ndarray, values_b: np.ndarray, bounds_b: np.ndarray) -> np.ndarray:
    """Exact Jaccard of pairs of sorted distinct sets (pair p: ``values[bounds[p]:bounds[p + 1]]`` of each side).

    Every value is tagged with its pair number and all are sorted together: a value both sides of a pair
    hold appears twice in a row. One sort for all pairs, no Python loop per pair.
    """
    size_a, size_b = np.diff(bounds_a), np.diff(bounds_b)
    pairs = len(size_a)
    tagged = np.concatenate([np.repeat(np.arange(pairs, dtype=np.uint64), size_a) << np.uint64(32) | values_a,
                             np.repeat(np.arange(pairs, dtype=np.uint64), size_b) << np.uint64(32) | values_b])
    tagged.sort()
    both = tagged[1:][tagged[1:] == tagged[:-1]] >> np.uint64(32)
    shared = np.bincount(both.astype(np.int64), minlength=pairs)
    union = size_a + size_b - shared
    return np.where(union > 0, shared / np.maximum(union, 1), 1.0)


@numba.njit(cache=True, nogil=True)
def _root(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def union_roots(n, a, b):
    """Root of each of ``n`` dense ids after joining every ``(a[i], b[i])``; a set's root is its smallest id."""
    parent = np.arange(n)
    for i in range(a.shape[0]):
        ra = _root(parent, a[i])
        rb = _root(parent, b[i])
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb
    for x in range(n):
        parent[x] = _root(parent, x)
    return parent


def dense_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys that occur in pairs ``(a[i], b[i])``, and each pair as two positions into them.

    Keys are numbered in priority order (index documents first, then this corpus by key), so with
    :func:`union_roots` a component's root is its index document if it has one, else its smallest key:
    the document kept does not depend on task order. Memory is a few words per pair.
    """
    ordered, dense = np.unique(np.concatenate([a, b]) ^ INDEX_BIT, return_inverse=True)
    return ordered ^ INDEX_BIT, dense[:len(a)], dense[len(a):]
