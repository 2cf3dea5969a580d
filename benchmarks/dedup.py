"""Online near-duplicate dedup (the `near_dup` check) over 100,000 synthetic answers, on one core.

Each answer is ~200 words drawn from a Zipf-distributed vocabulary; a known share are planted
near-duplicates: a copy of an earlier original with 1 to 8 words substituted. The check runs exactly as
in a factory run: `check(sample)`, then `remember(sample)` when it passed. Reported: samples/s, memory
(RSS growth of the process over the run, and bytes per indexed sample), recall of the planted
near-duplicates (all of them, and those whose true word-trigram Jaccard is at least the threshold), and
false positives among the originals. Beside it, in the same process and on the same corpus: `near_dup`
as it was with datasketch's MinHashLSH for the index (and how many decisions agree), the same loop with
datasketch's own `MinHash.update_batch` (SHA-1 per shingle) on a subset, the `exact_dup` check, the resume
rebuild (`quality_checks.prime` from an accepted.jsonl) and the `factory stats` pass.

    .venv/bin/python benchmarks/dedup.py                  # 100,000 samples, 10% planted
    .venv/bin/python benchmarks/dedup.py --samples 20000  # quicker
    .venv/bin/python benchmarks/dedup.py --samples 1000000 --words 50 --near-dup-only  # the index at 1M
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from importlib import metadata
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apprentice.text import fold_words
from factory.records import Sample  # noqa: E402
from quality_checks import build_checks, prime  # noqa: E402
from quality_checks.minhash import text_shingles  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_corpus(n: int, planted_share: float, length: int, vocab: int, seed: int):
    """Texts, and for each planted near-duplicate its index → (source index, substituted words)."""
    rng = np.random.default_rng(seed)
    words_ = np.array([f"w{i}" for i in range(vocab)])
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    planted = set(rng.choice(np.arange(n // 20, n), size=int(n * planted_share), replace=False).tolist())
    tokens: list[np.ndarray] = []
    sources: dict[int, tuple[int, int]] = {}
    originals: list[int] = []
    for i in range(n):
        if i in planted:
            source = originals[int(rng.integers(len(originals)))]
            copy = tokens[source].copy()
            edits = int(rng.integers(1, 9))
            copy[rng.choice(length, size=edits, replace=False)] = rng.choice(vocab, size=edits, p=p)
            tokens.append(copy)
            sources[i] = (source, edits)
        else:
            tokens.append(rng.choice(vocab, size=length, p=p))
            originals.append(i)
    texts = [" ".join(words_[t]) for t in tokens]
    return texts, sources


def true_jaccard(a: str, b: str, shingle: int = 3) -> float:
    sa, sb = set(text_shingles(a, shingle).tolist()), set(text_shingles(b, shingle).tolist())
    return len(sa & sb) / len(sa | sb)


def to_sample(i: int, text: str) -> Sample:
    """A fresh Sample, as the pipeline makes one per answer: the index holds the only copy of its id."""
    return Sample(id=f"{i:024x}", prompt=[{"role": "user", "content": f"q{i}"}],
                  completion=[{"role": "assistant", "content": text}], teacher={})


def traced_bytes(check, texts: list[str]) -> int:
    """Bytes the check holds after the online loop (tracemalloc counts numpy's buffers too)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    run_online(check, texts)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held


def run_online(check, texts: list[str]) -> tuple[float, list[str | None]]:
    """(seconds, the id each sample was found to duplicate or None) for the check-then-remember loop."""
    found: list[str | None] = []
    start = time.perf_counter()
    for i, text in enumerate(texts):
        sample = to_sample(i, text)
        verdict = check(sample)
        if verdict.passed:
            check.remember(sample)
            found.append(None)
        else:
            found.append(verdict.reason.split()[2] if verdict.reason.startswith("near") else verdict.reason)
    return time.perf_counter() - start, found


class DatasketchIndexNearDup:
    """`near_dup` as it was before quality_checks/lsh.py: the same numpy signatures, confirmed the same way,
    with candidates from datasketch's MinHashLSH (a bytes key and a Python set per band and answer)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        from datasketch import MinHash, MinHashLSH

        from quality_checks.minhash import MinHasher

        self.hasher = MinHasher(num_perm, 3)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.probe = MinHash(num_perm=num_perm, permutations=self.hasher.permutations, scheme="affine32")
        self.threshold = threshold
        self.signatures: list[np.ndarray] = []
        self.labels: list[str] = []
        self._last = None

    def __call__(self, sample):
        from quality_checks import PASS, Verdict

        self._last = signature = self.hasher.signature(sample.text)
        self.probe.hashvalues = signature
        best_row, best = -1, -1.0
        for row in self.lsh.query(self.probe):
            similarity = np.count_nonzero(self.signatures[row] == signature) / len(signature)
            if similarity > best:
                best_row, best = row, similarity
        if best_row >= 0 and best >= self.threshold:
            return Verdict(False, f"near-duplicate of {self.labels[best_row]} (Jaccard ~{best:.2f})", best)
        return PASS

    def remember(self, sample):
        self.probe.hashvalues = self._last
        self.lsh.insert(len(self.signatures), self.probe, check_duplication=False)
        self.signatures.append(self._last)
        self.labels.append(sample.id)


class DatasketchNearDup:
    """The same online loop with datasketch doing the hashing: MinHash.update_batch over the shingles."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        from datasketch import MinHash, MinHashLSH

        self.MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))  # as near_dup
        self.num_perm = num_perm
        self.threshold = threshold
        self.signatures: list = []
        self._last = None

    def __call__(self, sample):
        from quality_checks import PASS, Verdict

        tokens = fold_words(sample.text)
        minhash = self.MinHash(num_perm=self.num_perm)
        minhash.update_batch([" ".join(tokens[i : i + 3]).encode() for i in range(len(tokens) - 2)])
        self._last = minhash
        for row in self.lsh.query(minhash):
            if minhash.jaccard(self.signatures[row]) >= self.threshold:
                return Verdict(False, f"near-duplicate of {row}")
        return PASS

    def remember(self, sample):
        self.lsh.insert(len(self.signatures), self._last, check_duplication=False)
        self.signatures.append(self._last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--planted", type=float, default=0.10, help="share of planted near-duplicates")
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=20_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--reference-samples", type=int, default=5_000, help="samples for the datasketch row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--near-dup-only", action="store_true",
                        help="only the near_dup rows (for a 1M run): no datasketch, exact_dup, resume or stats rows")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    t0 = time.perf_counter()
    texts, sources = make_corpus(args.samples, args.planted, args.words, args.vocab, args.seed)
    print(f"corpus: {len(texts)} texts, {len(sources)} planted, {time.perf_counter() - t0:.1f} s to make", flush=True)

    load_before = os.getloadavg()
    rows = []
    # near_dup, the check as the factory runs it, and beside it (same corpus) the datasketch-LSH index it
    # replaced; RSS growth is taken first, on a heap that has not freed and reused anything yet, and
    # tracemalloc (which slows the loop) in a second, untimed pass
    near_dup = {"name": "near_dup", "threshold": args.threshold}
    variants = [("near_dup (numpy signatures + numpy band index)", lambda: build_checks([near_dup])[0])]
    if not args.near_dup_only:
        variants.append(("near_dup before (numpy signatures + datasketch MinHashLSH)",
                         lambda: DatasketchIndexNearDup(args.threshold)))
    planted_ids = {i: s for i, s in sources.items()}
    truth = {i: true_jaccard(texts[i], texts[s]) for i, (s, _) in planted_ids.items()}
    above = [i for i, j in truth.items() if j >= args.threshold]
    below = [i for i in planted_ids if truth[i] < args.threshold]
    detections = []
    for label, make in variants:
        check = make()
        gc.collect()
        before = rss_bytes()
        seconds, found = run_online(check, texts)
        grown = rss_bytes() - before
        indexed = sum(1 for f in found if f is None)
        del check
        gc.collect()
        traced = traced_bytes(make(), texts)
        gc.collect()
        rows.append((label, len(texts), seconds, grown, traced, indexed))
        hit = {i for i in planted_ids if found[i] is not None}
        false_pos = sum(1 for i, f in enumerate(found) if f is not None and i not in planted_ids)
        detections.append((label, found, hit, false_pos))
        print(f"{label}: {len(texts) / seconds:,.0f} samples/s, RSS +{grown / 2**20:.0f} MiB, traced "
              f"{traced / 2**20:.0f} MiB ({traced / indexed:,.0f} bytes per indexed sample), found "
              f"{len(hit)} of {len(planted_ids)} planted, {false_pos} false positives", flush=True)
    found, hit = detections[0][1:3]
    buckets = {}
    for i, j in truth.items():
        low = min(0.95, int(j * 20) / 20)
        found_, total_ = buckets.get(low, (0, 0))
        buckets[low] = (found_ + (i in hit), total_ + 1)
    if args.near_dup_only:
        print_report(args, texts, sources, load_before, rows, detections, planted_ids, above, below, buckets)
        return

    # datasketch doing the hashing itself, on a subset: the per-shingle loop this project avoids
    reference = DatasketchNearDup(args.threshold)
    subset = texts[: args.reference_samples]
    ref_seconds, _ = run_online(reference, subset)
    rows.append(("datasketch MinHash.update_batch + MinHashLSH (same loop)", len(subset), ref_seconds, None, None, None))
    del reference

    # exact_dup (its RSS growth would be freed memory reused from the passes above: traced only)
    exact_seconds, exact_found = run_online(build_checks(["exact_dup"])[0], texts)
    gc.collect()
    exact_traced = traced_bytes(build_checks(["exact_dup"])[0], texts)
    rows.append(("exact_dup", len(texts), exact_seconds, None, exact_traced, sum(1 for f in exact_found if f is None)))
    gc.collect()

    # resume: rebuild both indexes from an accepted.jsonl of the accepted samples; and the stats pass
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        with open(run_dir / "accepted.jsonl", "w", encoding="utf-8") as handle:
            for i, (text, f) in enumerate(zip(texts, found)):
                if f is None:
                    handle.write(to_sample(i, text).to_json() + "\n")
        checks = build_checks(["exact_dup", {"name": "near_dup", "threshold": args.threshold}])
        start = time.perf_counter()
        primed = prime(checks, run_dir / "accepted.jsonl")
        prime_seconds = time.perf_counter() - start
        del checks
        gc.collect()
        from factory.stats import compute_stats

        start = time.perf_counter()
        compute_stats(run_dir, {})
        stats_seconds = time.perf_counter() - start

    print_report(args, texts, sources, load_before, rows, detections, planted_ids, above, below, buckets,
                 (primed, prime_seconds, stats_seconds))


def print_report(args, texts, sources, load_before, rows, detections, planted_ids, above, below, buckets,
                 resume=None) -> None:
    _, found, hit, false_pos = detections[0]
    recall_all = len(hit) / max(1, len(planted_ids))
    recall_above = len(hit & set(above)) / max(1, len(above))
    flagged_below = len(hit & set(below)) / max(1, len(below))
    print()
    print(f"Command: `.venv/bin/python benchmarks/dedup.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores (pinned to one), Python {platform.python_version()}, "
          f"{platform.platform()}")
    print(f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"Versions: datasketch {metadata.version('datasketch')}, numpy {np.__version__}")
    print(f"Corpus: {len(texts):,} answers of {args.words} words (Zipf vocabulary of {args.vocab:,}), "
          f"{len(sources):,} planted near-duplicates (1-8 words substituted), threshold {args.threshold}, "
          "128 permutations, word trigrams, seed " + str(args.seed))
    print()
    print("| what | samples | samples/s | RSS growth (MiB) | traced (MiB) | traced bytes per indexed sample |")
    print("|---|---|---|---|---|---|")
    for name, n, secs, grown_bytes, traced_, kept in rows:
        rss = f"{grown_bytes / 2**20:.0f}" if grown_bytes is not None else "-"
        mem = f"{traced_ / 2**20:.1f}" if traced_ is not None else "-"
        per = f"{traced_ / kept:,.0f}" if traced_ is not None and kept else "-"
        print(f"| {name} | {n:,} | {n / secs:,.0f} | {rss} | {mem} | {per} |")
    print()
    print(f"| near_dup detection | value |\n|---|---|")
    if len(detections) > 1:
        (_, new, _, _), (_, old, old_hit, old_false) = detections[:2]
        same = sum(1 for a, b in zip(new, old) if (a is None) == (b is None))
        same_id = sum(1 for a, b in zip(new, old) if a == b)
        print(f"| before (datasketch MinHashLSH): planted found, false positives | {len(old_hit):,} of "
              f"{len(planted_ids):,} ({len(old_hit) / max(1, len(planted_ids)):.1%}), {old_false} |")
        print(f"| same decision as before / same duplicate named | {same:,} / {same_id:,} of {len(new):,} |")
    print(f"| planted near-duplicates found | {len(hit):,} of {len(planted_ids):,} ({recall_all:.1%}) |")
    print(f"| ... of those with true trigram Jaccard >= {args.threshold} | {len(hit & set(above)):,} of {len(above):,} ({recall_above:.2%}) |")
    print(f"| ... of those below {args.threshold} (flagged anyway) | {len(hit & set(below)):,} of {len(below):,} ({flagged_below:.1%}) |")
    print(f"| originals flagged (false positives) | {false_pos} of {len(texts) - len(planted_ids):,} |")
    print()
    print("| true trigram Jaccard of the planted pair | planted | found |\n|---|---|---|")
    for low in sorted(buckets):
        found_, total_ = buckets[low]
        print(f"| {low:.2f}-{low + 0.05:.2f} | {total_:,} | {found_:,} ({found_ / total_:.1%}) |")
    if resume is None:
        return
    primed, prime_seconds, stats_seconds = resume
    print()
    print(f"| resume and stats | value |\n|---|---|")
    print(f"| rebuild exact_dup + near_dup from accepted.jsonl ({primed:,} samples) | {prime_seconds:.1f} s "
          f"({primed / prime_seconds:,.0f} samples/s) |")
    print(f"| `factory stats` pass over the same accepted.jsonl | {stats_seconds:.1f} s "
          f"({stats_seconds / max(1, primed) * 1e6:.0f} µs per record) |")


if __name__ == "__main__":
    main()
