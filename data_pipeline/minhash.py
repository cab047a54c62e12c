"""MinHash signatures compiled with numba, equal to datasketch's ``MinHash`` (scheme ``affine32``).

Shingles are ``ngram`` consecutive words of the normalized text (lowercased code point by code
point, punctuation -> space; a character of a script written without spaces (CJK, Thai, Lao, Khmer,
Myanmar) is a word on its own, as :mod:`puyu.data_pipeline.language` splits words for the filters).
A shingle's 32-bit hash folds FNV-1a-64 hashes of its words, so each word is hashed once however many shingles hold it. Permutations are datasketch's: seeded
``RandomState``, ``h -> a*fmix32(h) + b mod 2^32`` with odd ``a``. Given :func:`shingle_hash32` as
``hashfunc``, ``datasketch.MinHash(num_perm, seed)`` fed :func:`shingles` has the same hashvalues.
"""
from __future__ import annotations

import functools
import re
import string

import numba
import numpy as np
from puyu.data_pipeline.language import UNSPACED

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1
MAX_HASH = 0xFFFFFFFF

_PUNCTUATION = string.punctuation + "…·•—–‘’“”«»「」『』（），。：；！？、《》【】〈〉"
_OTHER_SPACES = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029" \
                "\u202f\u205f\u3000\x1c\x1d\x1e\x1f\x85"
_CASED_LIMIT = 0x20000  # every cased script lies below this code point
# Words as the compiled scanner sees them: a character of an unspaced script alone, else a run of non-space bytes.
_CJK = UNSPACED
_WORD_RE = re.compile(f"[{_CJK}]|[^\t\n\x0b\x0c\r {_CJK}]+")
# The same separators for the compiled scanner: a table for ASCII, sorted code points above it.
_ASCII_SEPARATOR = np.zeros(128, dtype=np.bool_)
_ASCII_SEPARATOR[[ord(c) for c in _PUNCTUATION + _OTHER_SPACES + " \t\n\x0b\x0c\r" if ord(c) < 128]] = True
_WIDE_SEPARATORS = np.array(sorted(ord(c) for c in _PUNCTUATION + _OTHER_SPACES if ord(c) >= 128), dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _lowercase() -> tuple[dict[int, str], np.ndarray]:
    """Simple (one code point to one) lowercase mapping, as a translate table and as an array.

    Per code point, so the compiled scanner can apply it byte-wise without context; Python's
    ``str.lower`` differs only in its multi-character and context rules (İ, final sigma).
    """
    mapping = np.arange(_CASED_LIMIT, dtype=np.int32)
    table: dict[int, str] = {ord(c): " " for c in _PUNCTUATION + _OTHER_SPACES}
    for cp in range(_CASED_LIMIT):
        lower = chr(cp).lower()
        if len(lower) == 1 and lower != chr(cp) and not 0xD800 <= cp < 0xE000:
            mapping[cp] = ord(lower)
            table[cp] = lower
    return table, mapping


def normalize_for_shingles(text: str) -> str:
    """Lowercase (per code point), punctuation and odd spaces -> space. Input is NFC from Normalize."""
    return text.translate(_lowercase()[0])


def shingles(text: str, ngram: int) -> list[bytes]:
    """Reference shingling in pure Python (the compiled path must agree with it)."""
    words = _WORD_RE.findall(normalize_for_shingles(text))
    if len(words) < ngram:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i:i + ngram]).encode() for i in range(len(words) - ngram + 1)]


def _fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def _fold32(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    return (h ^ (h >> 32)) & MAX_HASH


def shingle_hash32(shingle: bytes) -> int:
    """The 32-bit shingle hash, in pure Python: pass it to datasketch as ``hashfunc``."""
    h = FNV_OFFSET
    for word in shingle.split(b" "):
        h = ((h ^ _fnv1a64(word)) * FNV_PRIME) & MASK64
    return _fold32(h)


@functools.lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 parameters: the same RandomState draws in the same order."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


@numba.njit(cache=True, nogil=True)
def _fmix32(h):
    h ^= h >> np.uint32(16)
    h = np.uint32(h * np.uint32(0x85EBCA6B))
    h ^= h >> np.uint32(13)
    h = np.uint32(h * np.uint32(0xC2B2AE35))
    return h ^ (h >> np.uint32(16))


@numba.njit(cache=True, nogil=True)
def _hash_code_point(h, cp):
    """FNV-1a-64 step over the UTF-8 bytes of one code point."""
    if cp < 0x80:
        return (h ^ np.uint64(cp)) * np.uint64(FNV_PRIME)
    if cp < 0x800:
        h = (h ^ np.uint64(0xC0 | (cp >> 6))) * np.uint64(FNV_PRIME)
    elif cp < 0x10000:
        h = (h ^ np.uint64(0xE0 | (cp >> 12))) * np.uint64(FNV_PRIME)
        h = (h ^ np.uint64(0x80 | ((cp >> 6) & 0x3F))) * np.uint64(FNV_PRIME)
    else:
        h = (h ^ np.uint64(0xF0 | (cp >> 18))) * np.uint64(FNV_PRIME)
        h = (h ^ np.uint64(0x80 | ((cp >> 12) & 0x3F))) * np.uint64(FNV_PRIME)
        h = (h ^ np.uint64(0x80 | ((cp >> 6) & 0x3F))) * np.uint64(FNV_PRIME)
    return (h ^ np.uint64(0x80 | (cp & 0x3F))) * np.uint64(FNV_PRIME)


@numba.njit(cache=True, nogil=True)
def _word_hashes(buf, start, end, out, ascii_sep, wide_sep, lower):
    """FNV-1a-64 of each word of UTF-8 ``buf[start:end]`` into ``out``; returns the word count.

    Letters are lowercased on the way (``lower``: code point -> lowercase code point); separators
    are ASCII whitespace/punctuation and the code points in ``wide_sep``; a character of an unspaced
    script (``language.UNSPACED``) is a word.
    """
    n = 0
    i = start
    in_word = False
    h = np.uint64(FNV_OFFSET)
    while i < end:
        c = buf[i]
        if c < 0x80:  # fast path: one ASCII byte
            if ascii_sep[c]:
                if in_word:
                    out[n] = h
                    n += 1
                    in_word = False
            else:
                if not in_word:
                    h = np.uint64(FNV_OFFSET)
                    in_word = True
                if 65 <= c <= 90:
                    c += 32
                h = (h ^ np.uint64(c)) * np.uint64(FNV_PRIME)
            i += 1
            continue
        if c >= 0xF0:
            width = 4
            cp = ((c & 0x07) << 18) | ((buf[i + 1] & 0x3F) << 12) | ((buf[i + 2] & 0x3F) << 6) | (buf[i + 3] & 0x3F)
        elif c >= 0xE0:
            width, cp = 3, ((c & 0x0F) << 12) | ((buf[i + 1] & 0x3F) << 6) | (buf[i + 2] & 0x3F)
        else:
            width, cp = 2, ((c & 0x1F) << 6) | (buf[i + 1] & 0x3F)
        if cp < lower.shape[0]:
            cp = lower[cp]
        i += width
        k = np.searchsorted(wide_sep, cp)
        if k < wide_sep.shape[0] and wide_sep[k] == cp:  # separator
            if in_word:
                out[n] = h
                n += 1
                in_word = False
        elif ((0x2E80 <= cp <= 0x9FFF) or (0xF900 <= cp <= 0xFAFF) or (0x0E00 <= cp <= 0x0EFF)
              or (0x1000 <= cp <= 0x109F) or (0x1780 <= cp <= 0x17FF)):  # an unspaced script's character is a word
            if in_word:
                out[n] = h
                n += 1
                in_word = False
            out[n] = _hash_code_point(np.uint64(FNV_OFFSET), cp)
            n += 1
        else:
            if not in_word:
                h = np.uint64(FNV_OFFSET)
                in_word = True
            h = _hash_code_point(h, cp)
    if in_word:
        out[n] = h
        n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _shingle_hash(words, s, width):
    """The 32-bit hash of the shingle of ``width`` words from ``s`` (what datasketch's permutations see)."""
    h = np.uint64(FNV_OFFSET)
    for k in range(width):
        h = (h ^ words[s + k]) * np.uint64(FNV_PRIME)
    h ^= h >> np.uint64(33)
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return _fmix32(np.uint32((h ^ (h >> np.uint64(32))) & np.uint64(MAX_HASH)))


@numba.njit(cache=True, nogil=True)
def _signatures(buf, starts, ends, a, b, ngram, out, ascii_sep, wide_sep, lower):
    num_perm = a.shape[0]
    longest = np.max(ends - starts) if starts.shape[0] else 0
    words = np.empty(longest // 2 + 1, dtype=np.uint64)
    row = np.empty(num_perm, dtype=np.uint32)
    for d in range(starts.shape[0]):
        n = _word_hashes(buf, starts[d], ends[d], words, ascii_sep, wide_sep, lower)
        row[:] = np.uint32(MAX_HASH)
        n_shingles = n - ngram + 1 if n >= ngram else (1 if n > 0 else 0)
        width = ngram if n >= ngram else n
        for s in range(n_shingles):
            hv = _shingle_hash(words, s, width)
            for p in range(num_perm):
                v = np.uint32(a[p] * hv + b[p])
                if v < row[p]:
                    row[p] = v
        out[d, :] = row


@numba.njit(cache=True, nogil=True)
def _shingle_sets(buf, starts, ends, ngram, out, bounds, ascii_sep, wide_sep, lower):
    """Each document's distinct shingle hashes, sorted, one after another in ``out`` (ends in ``bounds``)."""
    longest = np.max(ends - starts) if starts.shape[0] else 0
    words = np.empty(longest // 2 + 1, dtype=np.uint64)
    pos = 0
    for d in range(starts.shape[0]):
        n = _word_hashes(buf, starts[d], ends[d], words, ascii_sep, wide_sep, lower)
        n_shingles = n - ngram + 1 if n >= ngram else (1 if n > 0 else 0)
        width = ngram if n >= ngram else n
        for s in range(n_shingles):
            out[pos + s] = _shingle_hash(words, s, width)
        values = np.sort(out[pos:pos + n_shingles])
        k = pos
        for i in range(n_shingles):
            if i == 0 or values[i] != values[i - 1]:
                out[k] = values[i]
                k += 1
        pos = k
        bounds[d + 1] = pos
    return pos


_P1, _P2, _P3 = np.uint64(0x9E3779B185EBCA87), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)
_P4, _P5 = np.uint64(0x85EBCA77C2B2AE63), np.uint64(0x27D4EB2F165667C5)


@numba.njit(cache=True, nogil=True)
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(cache=True, nogil=True)
def _content_hashes(buf, starts, ends):
    """64-bit hash of each byte range (xxh64's single-lane rounds and avalanche): exact-dedup keys."""
    out = np.empty(starts.shape[0], dtype=np.uint64)
    for d in range(starts.shape[0]):
        i, end = starts[d], ends[d]
        h = _P5 + np.uint64(end - i)
        while i + 8 <= end:
            k = np.uint64(0)
            for j in range(8):
                k |= np.uint64(buf[i + j]) << np.uint64(8 * j)
            h ^= _rotl(k * _P2, 31) * _P1
            h = _rotl(h, 27) * _P1 + _P4
            i += 8
        while i < end:
            h ^= np.uint64(buf[i]) * _P5
            h = _rotl(h, 11) * _P1
            i += 1
        h ^= h >> np.uint64(33)
        h *= _P2
        h ^= h >> np.uint64(29)
        h *= _P3
        out[d] = h ^ (h >> np.uint64(32))
    return out


class EncodedBatch:
    """The UTF-8 of a batch of texts in one buffer, with each text's byte range."""

    def __init__(self, texts: list[str]) -> None:
        pieces = [t.encode("utf-8", "surrogatepass") for t in texts]
        bounds = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=bounds[1:])
        self.buf = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self.starts, self.ends = bounds[:-1], bounds[1:]

    def signatures(self, num_perm: int, seed: int, ngram: int) -> np.ndarray:
        a, b = permutations(num_perm, seed)
        out = np.empty((len(self.starts), num_perm), dtype=np.uint32)
        _signatures(self.buf, self.starts, self.ends, a, b, ngram, out, _ASCII_SEPARATOR, _WIDE_SEPARATORS,
                    _lowercase()[1])
        return out

    def shingle_sets(self, ngram: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, bounds): document d's sorted distinct shingle hashes are ``values[bounds[d]:bounds[d + 1]]``."""
        out = np.empty(int(np.sum((self.ends - self.starts) // 2 + 1)), dtype=np.uint32)
        bounds = np.zeros(len(self.starts) + 1, dtype=np.int64)
        used = _shingle_sets(self.buf, self.starts, self.ends, ngram, out, bounds, _ASCII_SEPARATOR,
                             _WIDE_SEPARATORS, _lowercase()[1])
        return out[:used], bounds

    def content_hashes(self) -> np.ndarray:
        return _content_hashes(self.buf, self.starts, self.ends)


def signatures(texts: list[str], num_perm: int = 128, seed: int = 1, ngram: int = 5) -> np.ndarray:
    """MinHash signatures, one uint32 row of ``num_perm`` per text."""
    return EncodedBatch(texts).signatures(num_perm, seed, ngram)


@numba.njit(cache=True, nogil=True)
def band_hashes(sigs, bands, rows):
    """One 64-bit hash per band: documents sharing one are LSH candidates."""
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    for d in range(sigs.shape[0]):
        for k in range(bands):
            h = np.uint64(FNV_OFFSET) ^ np.uint64(k)
            for j in range(k * rows, (k + 1) * rows):
                h = (h ^ np.uint64(sigs[d, j])) * np.uint64(FNV_PRIME)
                h ^= h >> np.uint64(29)
            out[d, k] = h
    return out


def _false_positive(threshold: float, b: int, r: int) -> float:
    from scipy.integrate import quad  # here: scipy.integrate is most of a dedup task's start-up time

    return quad(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)[0]


def _false_negative(threshold: float, b: int, r: int) -> float:
    from scipy.integrate import quad

    return quad(lambda s: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)[0]


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false positive + negative area, as datasketch's MinHashLSH."""
    best, best_error = (0, 0), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            error = fp_weight * _false_positive(threshold, b, r) + fn_weight * _false_negative(threshold, b, r)
            if error < best_error:
                best, best_error = (b, r), error
    return best
