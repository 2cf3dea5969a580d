"""Factory runs → `datasets.Dataset` train/eval splits in TRL's conversational prompt–completion format."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.errors import ApprenticeError
from factory.review_ledger import ReviewError, reviewed_records

KEEP = ("id", "prompt", "completion", "attributes")


class DataError(ApprenticeError):
    """Training data that cannot be used; the message names the path and the fix."""


@dataclass
class RunInfo:
    path: str
    samples: int
    fingerprint_hash: str | None


def read_run(run_dir: Path) -> tuple[list[dict[str, Any]], RunInfo]:
    """The accepted samples of one run after human review, reduced to what training needs, and the
    run's lineage. review.jsonl (`python -m factory review --promote/--demote`) decides: demoted accepted
    samples are left out and promoted rejected samples are taken in."""
    run_dir = Path(run_dir)
    accepted = run_dir / "accepted.jsonl"
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found (sft.data lists factory output_dir folders)")
    if not accepted.is_file():
        raise DataError(
            f"{accepted}: no accepted.jsonl in this run directory; run `python -m factory generate` first"
        )
    rows: list[dict[str, Any]] = []
    try:
        for _, _, record in reviewed_records(run_dir):
            rows.append({
                "id": record["id"],
                # The n samples of one prompt stay on one side of the held-out split.
                "group": f"{run_dir}:{record.get('prompt_id') or record['id']}",
                "prompt": record["prompt"],
                "completion": record["completion"],
                # JSON text: attributes differ between runs and Arrow needs one schema for the column
                "attributes": json.dumps(record.get("attributes") or {}, sort_keys=True),
            })
    except ReviewError as exc:
        raise DataError(str(exc)) from None
    return rows, RunInfo(str(run_dir), len(rows), _fingerprint(run_dir))


def _fingerprint(run_dir: Path) -> str | None:
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint_hash")
    except (json.JSONDecodeError, AttributeError):
        return None


def load_splits(run_dirs: list[Path], held_out: float, seed: int, stratify_by: str | None = None):
    """(train, eval or None, [RunInfo]) from the samples of all runs.

    The held-out split is seeded and made of whole prompts: the n samples a teacher gave for one prompt
    are all in training or all held out, so held-out loss is not measured on near-copies of training
    data. With `stratify_by`, each value of that attribute gives its share of held-out prompts.
    """
    from datasets import Dataset

    rows: list[dict[str, Any]] = []
    runs: list[RunInfo] = []
    for run_dir in run_dirs:
        run_rows, info = read_run(run_dir)
        rows.extend(run_rows)
        runs.append(info)
    if not rows:
        raise DataError(f"no accepted samples in {', '.join(str(p) for p in run_dirs)}: nothing to train on")
    dataset = Dataset.from_list(rows)
    if held_out <= 0:
        return dataset, None, runs
    held = held_out_rows(rows, held_out, seed, stratify_by)
    if len(held) >= len(rows):
        raise DataError(
            f"sft.held_out={held_out} leaves no training sample out of {len(rows)}; lower it or add data"
        )
    train = [i for i in range(len(rows)) if i not in held]
    return dataset.select(train), dataset.select(sorted(held)), runs


def held_out_rows(rows: list[dict[str, Any]], held_out: float, seed: int, stratify_by: str | None) -> set[int]:
    """Indices of the held-out rows: about `held_out` of the prompts (at least one), chosen by a seeded shuffle."""
    import random

    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row["group"], []).append(index)
    strata: dict[str, list[str]] = {}
    for group, members in groups.items():
        value = "" if stratify_by is None else str(json.loads(rows[members[0]]["attributes"]).get(stratify_by))
        strata.setdefault(value, []).append(group)
    if stratify_by is not None and list(strata) == ["None"]:
        raise DataError(f"sft.stratify_by={stratify_by!r}: no sample has that attribute; check its name")
    rng = random.Random(seed)
    held: set[int] = set()
    for value in sorted(strata):
        names = sorted(strata[value])
        rng.shuffle(names)
        take = max(1, round(len(names) * held_out)) if stratify_by is None or len(names) > 1 else 0
        for group in names[:take]:
            held.update(groups[group])
    return held
