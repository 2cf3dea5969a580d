"""MinHash signatures of word shingles, computed with numpy.

datasketch's `MinHash.update` hashes each shingle with SHA-1 in a Python loop; for a 200-word answer
that costs about a millisecond. Here the words of the normalized text are hashed together as arrays
(a polynomial hash over the UTF-8 bytes, by prefix sums), shingles are combined and permuted as arrays,
and a signature costs about 0.15 ms. The permutation is datasketch's "affine32" scheme (MurmurHash3
finalizer, then `a * h + b mod 2**32` with odd `a`), so a signature equals datasketch's
`MinHash(scheme="affine32")` of the same shingle hashes (tests/test_checks.py holds them to it).

numpy only at import: the LSH index over these signatures is `quality_checks.lsh`, numpy too.
"""
from __future__ import annotations

import numpy as np

from apprentice.text import fold_text

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: combines word hashes into a shingle hash
_BASE = 0xC2B2AE3D27D4EB4F  # odd: the polynomial hash base; its inverse mod 2**64 exists
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_powers = np.ones(1, dtype=np.uint64)  # _BASE**k mod 2**64, grown on demand
_inverse_powers = np.ones(1, dtype=np.uint64)  # _BASE**-k mod 2**64


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    global _powers, _inverse_powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers), 4096)
        powers = np.full(size, _BASE, dtype=np.uint64)
        powers[0] = 1
        inverse = np.full(size, pow(_BASE, -1, 1 << 64), dtype=np.uint64)
        inverse[0] = 1
        _powers, _inverse_powers = np.cumprod(powers), np.cumprod(inverse)  # uint64 wraps: mod 2**64
    return _powers, _inverse_powers


def word_hashes(normalized: str) -> np.ndarray:
    """64-bit hashes of the words of a `fold_text`ed text (words separated by single spaces).

    Each word's hash is sum((byte + 1) * BASE**i) over its bytes, taken from one prefix sum over the
    whole text and shifted back by BASE**-start, so there is no Python loop over words.
    """
    data = np.frombuffer(normalized.encode("utf-8"), dtype=np.uint8)
    n = len(data)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    powers, inverse = _power_tables(n)
    spaces = np.flatnonzero(data == 32)
    starts = np.empty(len(spaces) + 1, dtype=np.intp)
    starts[0] = 0
    starts[1:] = spaces + 1
    ends = np.empty(len(spaces) + 1, dtype=np.intp)
    ends[:-1] = spaces
    ends[-1] = n
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[:n], out=prefix[1:])
    return (prefix[ends] - prefix[starts]) * inverse[starts]


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (the pre-mix of datasketch's affine32 scheme); wraps mod 2**32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(words: np.ndarray, size: int) -> np.ndarray:
    """32-bit hashes of the `size`-grams of word hashes; a text shorter than `size` words is one shingle."""
    if words.size == 0:
        return np.zeros(0, dtype=np.uint32)
    n = len(words) - size + 1
    if n < 1:
        size, n = len(words), 1
    combined = words[:n].copy()
    for j in range(1, size):
        combined = combined * _MIX + words[j : j + n]
    return ((combined ^ (combined >> _SHIFT32)) & _LOW32).astype(np.uint32)


def text_shingles(text: str, size: int) -> np.ndarray:
    return shingle_hashes(word_hashes(fold_text(text)), size)


class MinHasher:
    """Signatures of `num_perm` uint32 values; equal positions estimate the Jaccard similarity of the
    texts' shingle sets. Two hashers with the same (num_perm, shingle, seed) give comparable signatures."""

    def __init__(self, num_perm: int = 128, shingle: int = 3, seed: int = 1) -> None:
        self.num_perm = num_perm
        self.shingle = shingle
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 1 << 31, num_perm, dtype=np.uint64).astype(np.uint32) * np.uint32(2) + np.uint32(1)
        b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)
        self.permutations = np.array([a, b])  # odd a: each permutation is a bijection on 32 bits
        self._a = a
        self._b = b
        self._empty = np.full(num_perm, 0xFFFFFFFF, dtype=np.uint32)

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        if hashes.size == 0:
            return self._empty.copy()
        mixed = fmix32(hashes.astype(np.uint32, copy=False)).reshape(-1, 1)
        return (mixed * self._a + self._b).min(axis=0)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(text_shingles(text, self.shingle))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a == b)) / len(a)


def mean_pairwise_jaccard(signatures: np.ndarray) -> float | None:
    """Mean estimated Jaccard similarity over all pairs of rows (None for fewer than two rows)."""
    n = len(signatures)
    if n < 2:
        return None
    total = 0.0
    for i in range(n - 1):  # a row against the rest: n * num_perm comparisons at a time, little memory
        total += float(np.count_nonzero(signatures[i + 1 :] == signatures[i])) / signatures.shape[1]
    return total / (n * (n - 1) / 2)
