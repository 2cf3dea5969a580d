"""`python -m factory stats RUN_DIR`: counts by reason, tokens, cost, throughput, attribute coverage, diversity.

One streaming pass over accepted.jsonl, rejected.jsonl and failed.jsonl with bounded memory: reason texts
and attribute values are counted up to a cap, and the diversity figures use a fixed-size sample chosen by
id (ids are hashes, so the smallest ids are a uniform sample, the same one every time). The pass costs
about 40 µs per record (a JSON parse, and the diversity figures on the sample; benchmarks/results/dedup.md);
the generate command runs it once when a run ends and writes the result into manifest.json under `stats`.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from apprentice.errors import ApprenticeError
from apprentice.text import fold_text
from quality_checks.minhash import MinHasher, mean_pairwise_jaccard, shingle_hashes, word_hashes

from .records import failing_reason, reason_template
from .review_ledger import read_actions
from .store import ACCEPTED, FAILED, REJECTED, read_manifest

DISTINCT_SAMPLE = 10_000  # completions for distinct-1/2: a fixed size keeps runs of any size comparable
PAIRWISE_SAMPLE = 500  # completions for the mean pairwise MinHash Jaccard distance (n² / 2 pairs)
MAX_KEYS = 1_000  # distinct reason texts per check, values per attribute: the rest count as "(other)"
TOP = 5


class StatsError(ApprenticeError):
    pass


class _Capped(Counter):
    def add(self, key: str) -> None:
        if key in self or len(self) < MAX_KEYS:
            self[key] += 1
        else:
            self["(other)"] += 1


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    return  # a run still writing, or a crash: the torn last line is cut on resume
                raise StatsError(f"{path}:{number}: not a JSON record") from None


def _usage(record: dict[str, Any], totals: dict[str, float]) -> None:
    """A record carries the usage of its whole request; with n samples per request, each has 1/n of it."""
    usage = record.get("usage") or {}
    share = max(1, int(usage.get("shared_by") or 1))
    totals["input_tokens"] += (usage.get("input_tokens") or 0) / share
    totals["output_tokens"] += (usage.get("output_tokens") or 0) / share
    totals["cost_usd"] += (usage.get("cost_usd") or 0.0) / share


def _attribute_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def diversity(texts: list[str]) -> dict[str, Any]:
    """distinct-1 / distinct-2 (unique word uni/bigrams over all of them, words as in dedup), and the mean
    pairwise MinHash Jaccard distance of word-trigram sets over the first PAIRWISE_SAMPLE texts."""
    import numpy as np

    unigrams: list[np.ndarray] = []
    bigrams: list[np.ndarray] = []
    for text in texts:
        tokens = word_hashes(fold_text(text))
        if len(tokens):
            unigrams.append(shingle_hashes(tokens, 1))
        if len(tokens) >= 2:
            bigrams.append(shingle_hashes(tokens, 2))

    def distinct(parts: list[np.ndarray]) -> float | None:
        if not parts:
            return None
        everything = np.concatenate(parts)
        return round(len(np.unique(everything)) / len(everything), 4)

    pairwise = texts[:PAIRWISE_SAMPLE]
    hasher = MinHasher(num_perm=128, shingle=3)
    similarity = mean_pairwise_jaccard(np.array([hasher.signature(t) for t in pairwise])) if len(pairwise) > 1 else None
    return {
        "distinct_1": distinct(unigrams),
        "distinct_2": distinct(bigrams),
        "mean_pairwise_jaccard_distance": None if similarity is None else round(1.0 - similarity, 4),
        "sample": len(texts),
        "pairwise_sample": len(pairwise),
    }


def compute_stats(run_dir: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / ACCEPTED).exists() and not (run_dir / REJECTED).exists():
        raise StatsError(f"{run_dir}: no accepted.jsonl or rejected.jsonl; is this a factory run directory?")
    manifest = manifest if manifest is not None else (read_manifest(run_dir) or {})
    totals = {"input_tokens": 0.0, "output_tokens": 0.0, "cost_usd": 0.0}
    attributes: dict[str, _Capped] = {}
    sample: list[tuple[int, str]] = []  # max-heap (negated keys) of the smallest ids
    accepted = 0
    for record in _records(run_dir / ACCEPTED):
        accepted += 1
        _usage(record, totals)
        for key, value in (record.get("attributes") or {}).items():
            attributes.setdefault(str(key), _Capped()).add(_attribute_value(value))
        completion = record.get("completion") or [{}]
        text = completion[0].get("content") or ""
        try:
            key = int(str(record.get("id", ""))[:16], 16)
        except ValueError:
            key = hash(record.get("id"))
        if len(sample) < DISTINCT_SAMPLE:
            heapq.heappush(sample, (-key, text))
        elif -sample[0][0] > key:
            heapq.heapreplace(sample, (-key, text))

    rejected = 0
    by_check: dict[str, int] = Counter()
    reasons: dict[str, _Capped] = {}
    for record in _records(run_dir / REJECTED):
        rejected += 1
        _usage(record, totals)
        name = str(record.get("rejected_by"))
        by_check[name] += 1
        reasons.setdefault(name, _Capped()).add(reason_template(failing_reason(record)))

    failed = 0
    errors = _Capped()
    for record in _records(run_dir / FAILED):
        failed += 1
        errors.add(reason_template(record.get("error")))

    texts = [text for _, text in sorted(sample, key=lambda item: -item[0])]
    judged = accepted + rejected
    run_totals = manifest.get("totals") or {}
    this_run = manifest.get("this_run") or {}
    elapsed = float(run_totals.get("elapsed_s") or 0.0)
    actions = Counter(read_actions(run_dir).values())
    return {
        "status": manifest.get("status"),
        "counts": {"accepted": accepted, "rejected": rejected, "failed": failed, "total": judged + failed},
        "acceptance_rate": round(accepted / judged, 4) if judged else None,
        "rejected_by": {
            name: {"count": count, "top_reasons": [[text, n] for text, n in reasons[name].most_common(TOP)]}
            for name, count in by_check.most_common()
        },
        "failed_errors": [[text, n] for text, n in errors.most_common(TOP)],
        "tokens": {"input": round(totals["input_tokens"]), "output": round(totals["output_tokens"])},
        "cost_usd": round(totals["cost_usd"], 6),
        # The records carry the teacher's usage; a judge's (all runs) is in the manifest only.
        **({"judge": run_totals["judge"]} if run_totals.get("judge") else {}),
        "throughput": {
            "elapsed_s": elapsed,
            "samples_per_s": round(judged / elapsed, 3) if elapsed else None,
            "output_tokens_per_s": round(totals["output_tokens"] / elapsed, 3) if elapsed else None,
            "last_run_requests_per_s": this_run.get("requests_per_s"),
        },
        "attributes": {key: dict(counter.most_common()) for key, counter in sorted(attributes.items())},
        "diversity": diversity(texts),
        "review": {"promoted": actions.get("promote", 0), "demoted": actions.get("demote", 0)},
    }


def stats_figures(stats: dict[str, Any]) -> dict[str, float]:
    """The run's final figures as tracker scalars (tag → number)."""
    figures: dict[str, float] = {f"factory/{key}": stats["counts"][key] for key in ("accepted", "rejected", "failed")}
    figures.update({f"factory/rejected_by/{name}": item["count"] for name, item in stats["rejected_by"].items()})
    figures.update({"factory/acceptance_rate": stats.get("acceptance_rate"), "factory/cost_usd": stats["cost_usd"],
                    "factory/tokens/input": stats["tokens"]["input"], "factory/tokens/output": stats["tokens"]["output"],
                    "factory/samples_per_s": (stats.get("throughput") or {}).get("samples_per_s")})
    div = stats.get("diversity") or {}
    figures.update({f"factory/diversity/{key}": div.get(key)
                    for key in ("distinct_1", "distinct_2", "mean_pairwise_jaccard_distance")})
    return {tag: value for tag, value in figures.items() if isinstance(value, (int, float))}


def render_stats(stats: dict[str, Any], run_dir: Path, console) -> None:
    """The same figures as rich tables."""
    from rich.markup import escape
    from rich.table import Table

    counts = stats["counts"]
    judged = counts["accepted"] + counts["rejected"]

    def pct(n: int, of: int) -> str:
        return f"{100.0 * n / of:.1f}%" if of else "-"

    table = Table(title=f"{escape(str(run_dir))} ({escape(str(stats.get('status')))})", title_justify="left")
    table.add_column("outcome")
    table.add_column("samples", justify="right")
    table.add_column("share", justify="right")
    table.add_column("most common reasons")
    table.add_row("accepted", str(counts["accepted"]), pct(counts["accepted"], judged), "")
    for name, item in stats["rejected_by"].items():
        top = "\n".join(f"{n} × {escape(text)}" for text, n in item["top_reasons"][:3])
        table.add_row(f"rejected: {escape(name)}", str(item["count"]), pct(item["count"], judged), top)
    failed_top = "\n".join(f"{n} × {escape(text)}" for text, n in stats["failed_errors"][:3])
    table.add_row("failed", str(counts["failed"]), "", failed_top)
    review = stats.get("review") or {}
    if review.get("promoted") or review.get("demoted"):
        table.add_row("review", f"+{review['promoted']} / -{review['demoted']}", "", "promoted / demoted (review.jsonl)")
    console.print(table)

    throughput = stats["throughput"]
    figures = Table(show_header=False, title="tokens, cost, throughput, diversity", title_justify="left")
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    rows = [
        ("input tokens", f"{stats['tokens']['input']:,}"),
        ("output tokens", f"{stats['tokens']['output']:,}"),
        ("cost", f"${stats['cost_usd']:.4f}"),
    ]
    if stats.get("judge"):
        judge = stats["judge"]
        rows += [("judge requests", f"{judge['requests']:,}"),
                 ("judge tokens in / out", f"{judge['input_tokens']:,} / {judge['output_tokens']:,}"),
                 ("judge cost", f"${judge['cost_usd']:.4f}")]
    rows += [
        ("elapsed (all runs)", f"{throughput['elapsed_s']:.1f} s"),
        ("samples / s", _fmt(throughput["samples_per_s"])),
        ("output tokens / s", _fmt(throughput["output_tokens_per_s"])),
        ("requests / s (last run)", _fmt(throughput["last_run_requests_per_s"])),
    ]
    div = stats["diversity"]
    rows += [
        (f"distinct-1 ({div['sample']} accepted)", _fmt(div["distinct_1"])),
        (f"distinct-2 ({div['sample']} accepted)", _fmt(div["distinct_2"])),
        (f"mean pairwise Jaccard distance ({div['pairwise_sample']})", _fmt(div["mean_pairwise_jaccard_distance"])),
    ]
    for row in rows:
        figures.add_row(*row)
    console.print(figures)

    if stats["attributes"]:
        attrs = Table(title="attribute coverage (accepted samples)", title_justify="left")
        attrs.add_column("attribute")
        attrs.add_column("values (count)")
        for key, values in stats["attributes"].items():
            shown = ", ".join(f"{escape(v)} ({n})" for v, n in list(values.items())[:10])
            more = f", … {len(values) - 10} more" if len(values) > 10 else ""
            attrs.add_row(escape(key), shown + more)
        console.print(attrs)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3f}".rstrip("0").rstrip(".")
