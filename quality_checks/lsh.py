"""A compact MinHash LSH band index in numpy: about 200 bytes per indexed row at 16 bands.

datasketch's `MinHashLSH` keeps, per band and row, a bytes key and a Python set in a dict: about 5.8 KB
per row at 16 bands (benchmarks/results/dedup.md), 5.5 GiB for a million accepted answers. Here a band
is one 64-bit hash of its slice of the signature, and the index is the (key, row) pairs of all bands in
sorted numpy runs: 12 bytes per band and row. New rows go to a small dict first; when it is full it is
sorted into a run, and runs of similar size are merged (as a binary counter counts), so there are at
most about log2(rows / 2048) runs to search, and each pair is copied about as many times.

The bands and rows per band are datasketch's (`_optimal_param`: the split that minimises the weighted
sum of the false positive and false negative areas), so the candidates are the rows datasketch's index
would return for the same signatures; a 64-bit key collision can only add a candidate, and the caller
confirms each candidate against its signature anyway.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=None)
def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float,
                  false_negative_weight: float) -> tuple[int, int]:
    """(bands, rows per band) as datasketch's `MinHashLSH` picks them for these weights.

    datasketch integrates P(candidate | Jaccard s) = 1 - (1 - s**r)**b with scipy's `quad`; that is a
    polynomial of degree b * r <= num_perm, so Gauss-Legendre quadrature with num_perm // 2 + 1 nodes
    is exact (up to rounding), and the pairs are tried in the same order (b, then r, first minimum). The
    results agree with datasketch 2.0.0 for every threshold 0.01..1.00 at 16..256 permutations.
    """
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def on(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
        half = (high - low) / 2
        return low + half * (nodes + 1), weights * half

    def missed(s: np.ndarray, r: int, most: int) -> np.ndarray:
        """(1 - s**r)**b for b = 1..most: the chance a pair at Jaccard s shares none of b bands."""
        return np.cumprod(np.broadcast_to(1 - s ** r, (most, len(s))), axis=0)

    (s_below, w_below), (s_above, w_above) = on(0.0, threshold), on(threshold, 1.0)
    error = np.full((num_perm + 1, num_perm + 1), np.inf)  # [b, r]: argmin takes the first b, then r
    for r in range(1, num_perm + 1):
        most = num_perm // r
        false_positive = (1 - missed(s_below, r, most)) @ w_below
        false_negative = missed(s_above, r, most) @ w_above
        error[1 : most + 1, r] = false_positive * false_positive_weight + false_negative * false_negative_weight
    best = int(np.argmin(error))
    return best // (num_perm + 1), best % (num_perm + 1)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer; wraps mod 2**64."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


class BandIndex:
    """Rows (0, 1, 2, ... in the order added) by the band keys of their signatures.

    `candidates(keys)` answers the rows that share at least one band with `keys`: the same rows as
    `MinHashLSH.query` with `b` bands of `r` permutations each.
    """

    PENDING = 2048  # rows held in the dict before they are sorted into a run

    def __init__(self, bands: int, rows_per_band: int, seed: int = 7) -> None:
        self.bands = bands
        self.rows_per_band = rows_per_band
        rng = np.random.default_rng(seed)
        # odd multipliers per (band, position): a band's key depends on its band and every value in it
        self._multipliers = rng.integers(0, 1 << 63, (bands, rows_per_band), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._pending: dict[int, int | list[int]] = {}
        self._pending_keys: list[np.ndarray] = []
        self._pending_first = 0  # the first row in the pending dict
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys uint64, rows int32), oldest first
        self.size = 0

    def keys(self, signature: np.ndarray) -> np.ndarray:
        """One uint64 per band, from its `rows_per_band` values of the signature."""
        block = signature[: self.bands * self.rows_per_band].reshape(self.bands, self.rows_per_band)
        return _mix64((block.astype(np.uint64) * self._multipliers).sum(axis=1, dtype=np.uint64))

    def candidates(self, keys: np.ndarray) -> set[int]:
        found: set[int] = set()
        for key in keys.tolist():
            rows = self._pending.get(key)
            if isinstance(rows, list):
                found.update(rows)
            elif rows is not None:
                found.add(rows)
        for run_keys, run_rows in self.runs:
            at = np.searchsorted(run_keys, keys)
            hit = at < len(run_keys)
            hit[hit] = run_keys[at[hit]] == keys[hit]
            if hit.any():  # rare: a band shared with an indexed row
                ends = np.searchsorted(run_keys, keys[hit], side="right")
                for start, end in zip(at[hit].tolist(), ends.tolist()):
                    found.update(run_rows[start:end].tolist())
        return found

    def add(self, keys: np.ndarray) -> int:
        row = self.size
        for key in keys.tolist():
            rows = self._pending.get(key)
            if rows is None:
                self._pending[key] = row
            elif isinstance(rows, list):
                rows.append(row)
            else:
                self._pending[key] = [rows, row]
        self._pending_keys.append(keys)
        self.size += 1
        if len(self._pending_keys) >= self.PENDING:
            self._flush()
        return row

    def _flush(self) -> None:
        keys = np.concatenate(self._pending_keys)
        rows = np.repeat(np.arange(self._pending_first, self.size, dtype=np.int32), self.bands)
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], rows[order]))
        self._pending.clear()
        self._pending_keys = []
        self._pending_first = self.size
        while len(self.runs) >= 2 and len(self.runs[-2][0]) <= len(self.runs[-1][0]):
            newer = self.runs.pop()
            older = self.runs.pop()
            self.runs.append(_merge(older, newer))


def _merge(older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one, in linear time and two output arrays (no argsort of the whole)."""
    old_keys, old_rows = older
    new_keys, new_rows = newer
    total = len(old_keys) + len(new_keys)
    at = np.searchsorted(old_keys, new_keys, side="right") + np.arange(len(new_keys))
    from_old = np.ones(total, dtype=bool)
    from_old[at] = False
    keys = np.empty(total, dtype=np.uint64)
    rows = np.empty(total, dtype=np.int32)
    keys[at], rows[at] = new_keys, new_rows
    keys[from_old], rows[from_old] = old_keys, old_rows
    return keys, rows
