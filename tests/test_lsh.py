import numpy as np
import pytest

from quality_checks.lsh import BandIndex, optimal_bands


def test_band_split_is_datasketchs_for_the_checks_defaults():
    # computed with datasketch 2.0.0's `_optimal_param` (scipy's quad); the module agrees with it for every
    # threshold 0.01..1.00 at 16..256 permutations and both weightings
    assert optimal_bands(0.8, 128, 0.05, 0.95) == (16, 8), "near_dup's default"
    assert optimal_bands(0.7, 128, 0.05, 0.95) == (21, 6), "contamination's default"
    assert optimal_bands(0.8, 128, 0.5, 0.5) == (9, 13), "datasketch's default weights"
    assert optimal_bands(0.5, 64, 0.05, 0.95) == _datasketch_bands(0.5, 64, 0.05, 0.95)


def _datasketch_bands(*args):
    lsh = pytest.importorskip("datasketch.lsh")
    return lsh._optimal_param(*args)


def signatures_with_near_copies(n: int, num_perm: int, seed: int = 0) -> np.ndarray:
    """Random signatures; every third row a copy of an earlier one with a few values changed."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 1 << 32, (n, num_perm), dtype=np.uint64).astype(np.uint32)
    for i in range(3, n, 3):
        rows[i] = rows[rng.integers(i)]
        changed = rng.choice(num_perm, size=int(rng.integers(1, 24)), replace=False)
        rows[i, changed] = rng.integers(0, 1 << 32, len(changed), dtype=np.uint64).astype(np.uint32)
    return rows


def test_candidates_are_the_rows_datasketch_returns_across_pending_rows_and_merged_runs(monkeypatch):
    datasketch = pytest.importorskip("datasketch")
    monkeypatch.setattr(BandIndex, "PENDING", 16)  # many flushes and merges in 600 rows
    rows = signatures_with_near_copies(600, 128)
    b, r = optimal_bands(0.8, 128, 0.05, 0.95)
    index = BandIndex(b, r)
    reference = datasketch.MinHashLSH(threshold=0.8, num_perm=128, weights=(0.05, 0.95))
    shared = 0
    for i, signature in enumerate(rows):
        keys = index.keys(signature)
        minhash = datasketch.MinHash(num_perm=128, hashvalues=signature, scheme="affine32")
        expected = set(reference.query(minhash))
        assert index.candidates(keys) == expected, f"row {i}"
        shared += bool(expected)
        assert index.add(keys) == i
        reference.insert(i, minhash, check_duplication=False)
    assert shared > 100, "the near copies share bands with their originals"
    assert len(index.runs) <= 6, "runs of equal size are merged"
