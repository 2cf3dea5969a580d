"""Cheap rule checks: empty answers, truncated answers, refusals."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .base import PASS, Verdict, register

if TYPE_CHECKING:
    from factory.records import Sample


@register("empty")
class Empty:
    name = "empty"

    def __call__(self, sample: "Sample") -> Verdict:
        if not sample.text.strip():
            return Verdict(False, "empty answer")
        return PASS


@register("truncated")
class Truncated:
    name = "truncated"

    def __call__(self, sample: "Sample") -> Verdict:
        if sample.finish_reason in ("length", "max_tokens"):
            return Verdict(False, "hit max_tokens (finish_reason=length): raise params.max_tokens or drop")
        return PASS


# Phrases that open or carry a refusal; matched case-insensitively near the start of the answer.
REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) (?:sorry|afraid)\b.{0,40}\b(?:can(?:no|')t|unable|not able)\b",
    r"\bI can(?:no|')t (?:help|assist|comply|provide|do that|answer)\b",
    r"\bI(?:'m| am) (?:unable|not able) to (?:help|assist|comply|provide)\b",
    r"\bI (?:won't|will not) (?:help|assist|provide|comply)\b",
    r"\bAs an AI(?: language model)?\b",
    r"\bI must (?:decline|refuse)\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE | re.DOTALL)
_REFUSAL_WINDOW = 300


@register("refusal")
class Refusal:
    name = "refusal"

    def __call__(self, sample: "Sample") -> Verdict:
        match = _REFUSAL.search(sample.text[:_REFUSAL_WINDOW])
        if match:
            return Verdict(False, f"refusal: {match.group(0)[:60]!r}")
        return PASS
