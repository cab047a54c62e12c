"""Compiled kernels of the MinHash buckets and clusters stages: bucket pairs and union-find over arrays.

Documents are 64-bit keys (``file << 32 | index in file``; a document of an earlier corpus's index has
:data:`INDEX_BIT` set). Both kernels work on flat numpy arrays so a stage holds a few bytes per
candidate or per duplicate, never a Python object per document, and never an array sized by the corpus.
"""
from __future__ import annotations

import numba
import numpy as np

INDEX_BIT = np.uint64(1 << 63)


@numba.njit(cache=True, nogil=True)
def _agreement(sigs, i, j):
    same = 0
    for p in range(sigs.shape[1]):
        if sigs[i, p] == sigs[j, p]:
            same += 1
    return same


@numba.njit(cache=True, nogil=True)
def bucket_pairs(hashes, keys, sigs, min_agree, max_leaders, verify):
    """Pairs ``(leader, member)`` of each run of equal ``hashes`` (sorted), and how many members found no leader.

    A run is one LSH bucket. Its first member leads; each later member is compared with the run's leaders
    in order and paired with the first whose signature agrees in at least ``min_agree`` rows, else it
    leads too (up to ``max_leaders``, which bounds the work of a huge bucket of unrelated documents).
    Comparing with every leader, not only the first, keeps a pair of duplicates that landed in a bucket
    with an unrelated first member. Without ``verify`` (content hashes) every member pairs with the first.
    Two index documents are never paired: only this corpus's documents can be removed.
    """
    n = hashes.shape[0]
    out_a = np.empty(n, dtype=np.uint64)
    out_b = np.empty(n, dtype=np.uint64)
    leaders = np.empty(max_leaders, dtype=np.int64)
    m = 0
    unmatched = 0
    i = 0
    while i < n:
        end = i + 1
        while end < n and hashes[end] == hashes[i]:
            end += 1
        n_leaders = 0
        for t in range(i, end):
            match = -1
            for q in range(n_leaders):
                if not verify or _agreement(sigs, leaders[q], t) >= min_agree:
                    match = leaders[q]
                    break
            if match >= 0:
                if (keys[match] & INDEX_BIT) == 0 or (keys[t] & INDEX_BIT) == 0:
                    out_a[m] = keys[match]
                    out_b[m] = keys[t]
                    m += 1
                continue
            if n_leaders > 0:
                unmatched += 1
            if n_leaders < max_leaders:
                leaders[n_leaders] = t
                n_leaders += 1
        i = end
    return out_a[:m], out_b[:m], unmatched


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
