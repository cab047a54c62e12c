"""Compiled n-gram statistics for the Gopher repetition rules.

Words are mapped to integer ids once; each n-gram is then a 64-bit rolling hash of its ids, so the
counting that dominated the filter stage runs in numba instead of joining millions of strings.
Results equal the string versions (checked in tests), n-grams being compared as word sequences,
unless two different n-grams share a 64-bit hash.
"""
from __future__ import annotations

import numba
import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def encode_words(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(word ids, word lengths in characters)."""
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    return ids, lengths


@numba.njit(cache=True, nogil=True)
def _gram_hashes(ids, n):
    count = ids.shape[0] - n + 1
    out = np.empty(max(count, 0), dtype=np.uint64)
    for i in range(count):
        h = np.uint64(n)
        for k in range(n):
            h = (h ^ np.uint64(ids[i + k])) * _MIX
            h ^= h >> np.uint64(31)
        out[i] = h
    return out


@numba.njit(cache=True, nogil=True)
def top_ngram_chars(ids, lengths, n):
    """Characters of the most frequent n-gram (words joined by spaces) times its count, if it repeats.

    Ties go to the n-gram seen first, as ``collections.Counter.most_common`` does.
    """
    hashes = _gram_hashes(ids, n)
    if hashes.shape[0] == 0:
        return 0
    order = np.argsort(hashes, kind="mergesort")
    best_count, best_first = 0, 0
    start = 0
    while start < order.shape[0]:
        end = start
        first = order[start]
        while end < order.shape[0] and hashes[order[end]] == hashes[order[start]]:
            first = min(first, order[end])
            end += 1
        count = end - start
        if count > best_count or (count == best_count and first < best_first):
            best_count, best_first = count, first
        start = end
    if best_count < 2:
        return 0
    chars = n - 1
    for k in range(n):
        chars += lengths[best_first + k]
    return chars * best_count


@numba.njit(cache=True, nogil=True)
def repeated_ngram_chars(ids, lengths, n):
    """Characters in n-grams (words joined without spaces) that repeat an earlier one, skipping each repeat."""
    hashes = _gram_hashes(ids, n)
    seen = {np.uint64(0): True}
    seen.clear()
    chars, i = 0, 0
    while i < hashes.shape[0]:
        if hashes[i] in seen:
            for k in range(n):
                chars += lengths[i + k]
            i += n
        else:
            seen[hashes[i]] = True
            i += 1
    return chars
