"""Golden sets: JSONL, one item a line: {id?, prompt: str | [messages], reference?, metric?, tags?}.

Every bad line is reported at once as file:line with the fix, before any model is loaded or paid.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apprentice.errors import RecipeError
from factory.prompts import parse_messages
from quality_checks.structured import parse_number

from .instructions import check_spec
from .metrics import METRICS, NEEDS_REFERENCE

KEYS = {"id", "prompt", "reference", "metric", "tags"}
MAX_REPORTED = 20


@dataclass(slots=True)
class GoldenItem:
    id: str
    set: str
    messages: list[dict[str, str]]
    reference: Any = None
    metrics: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Unique across golden sets."""
        return f"{self.set}/{self.id}"

    @property
    def prompt_text(self) -> str:
        return self.messages[-1]["content"]


def _item(data: Any, set_name: str, line: int, default_metrics: list[str]) -> GoldenItem:
    if not isinstance(data, dict):
        raise ValueError('expected an object like {"prompt": "...", "reference": "..."}')
    unknown = set(data) - KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(KEYS))}")
    if "prompt" not in data:
        raise ValueError('missing "prompt"')
    metric = data.get("metric", default_metrics)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; available: {', '.join(sorted(METRICS))}")
    if data.get("reference") is None and any(m in NEEDS_REFERENCE for m in metrics):
        raise ValueError(f'metric(s) {[m for m in metrics if m in NEEDS_REFERENCE]} need a "reference"')
    if "instruction" in metrics:
        check_spec(data["reference"])  # a misspelt constraint is named before any model answers
    if "number" in metrics and parse_number(str(data["reference"]).strip()) is None:
        raise ValueError(f'metric number: the reference {str(data["reference"])[:40]!r} is not a number')
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError('"tags" must be a list of strings')
    return GoldenItem(
        id=str(data.get("id", f"{set_name}:{line}")),
        set=set_name,
        messages=parse_messages(data["prompt"]),
        reference=data.get("reference"),
        metrics=metrics,
        tags=tags,
    )


def load_golden(paths: list[Path], default_metrics: list[str]) -> list[GoldenItem]:
    items: list[GoldenItem] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not Path(path).is_file():
            problems.append(f"{path}: golden set not found (eval.golden lists JSONL files)")
            continue
        set_name = Path(path).stem
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    item = _item(json.loads(raw), set_name, number, default_metrics)
                except json.JSONDecodeError as exc:
                    problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
                except ValueError as exc:
                    problems.append(f"{path}:{number}: {exc}")
                    continue
                key = f"{set_name}/{item.id}"
                if key in seen:
                    problems.append(f"{path}:{number}: id {item.id!r} repeats {seen[key]}; ids must be unique")
                    continue
                seen[key] = f"{path}:{number}"
                items.append(item)
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  … and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise RecipeError(f"{len(problems)} problem(s) in the golden sets:\n  " + "\n  ".join(shown) + more)
    if not items:
        raise RecipeError(f"the golden sets {[str(p) for p in paths]} hold no items")
    return items
