"""The `instruction` metric: does an answer follow instructions that code can check, as IFEval checks them
(exact word counts, required and forbidden words, casing, JSON shape, bullet counts, how it starts and ends)?

A golden line's reference is a mapping of constraints, e.g. {"words": 3, "case": "lower"}; the answer
scores 1 when it meets every one (IFEval's strict prompt-level accuracy), else 0. data/golden/instructions.jsonl
is a small general set of them, scored next to the task's golden sets (`eval.regression`) to see what a student
forgot in training.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

from quality_checks.structured import extract_json_text

CASES = ("lower", "upper")


def _words(answer: str) -> int:
    return len(re.findall(r"[^\W_]+(?:['’-][^\W_]+)*", answer))


def _bullets(answer: str) -> int:
    return sum(1 for line in answer.splitlines() if re.match(r"\s*[-*•]\s+\S", line))


def _json_keys(answer: str, keys: list[str]) -> bool:
    try:
        value = json.loads(extract_json_text(answer))
    except ValueError:
        return False
    return isinstance(value, dict) and sorted(value) == sorted(keys)


def _has(answer: str, word: str) -> bool:
    """The word or phrase, whole, in any case."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", answer.lower()) is not None


CHECKS: dict[str, tuple[type | tuple[type, ...], Callable[[str, Any], bool]]] = {
    "words": (int, lambda answer, n: _words(answer) == n),
    "min_words": (int, lambda answer, n: _words(answer) >= n),
    "max_words": (int, lambda answer, n: _words(answer) <= n),
    "keywords": (list, lambda answer, words: all(_has(answer, w) for w in words)),
    "forbidden": (list, lambda answer, words: not any(_has(answer, w) for w in words)),
    "case": (str, lambda answer, case: answer == (answer.lower() if case == "lower" else answer.upper())
             and any(c.isalpha() for c in answer)),
    "json_keys": (list, _json_keys),
    "bullets": (int, lambda answer, n: _bullets(answer) == n),
    "starts_with": (str, lambda answer, text: answer.strip().lower().startswith(text.lower())),
    "ends_with": (str, lambda answer, text: answer.strip().lower().endswith(text.lower())),
}


def check_spec(reference: Any) -> dict[str, Any]:
    """The constraints of a golden line, checked before any model answers; raises ValueError naming the fix."""
    spec = json.loads(reference) if isinstance(reference, str) else reference
    if not isinstance(spec, dict) or not spec:
        raise ValueError('metric instruction: "reference" must be a mapping of constraints, e.g. {"words": 3}')
    for key, value in spec.items():
        if key not in CHECKS:
            raise ValueError(f"metric instruction: unknown constraint {key!r}; known: {', '.join(CHECKS)}")
        kind = CHECKS[key][0]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"metric instruction: {key} must be a {kind.__name__}, not {value!r}")
        if key == "case" and value not in CASES:
            raise ValueError(f"metric instruction: case must be one of {CASES}, not {value!r}")
    return spec


def instruction(answer: str, reference: Any) -> float:
    spec = check_spec(reference)
    return float(all(CHECKS[key][1](answer, value) for key, value in spec.items()))
