"""Text normalisation shared by exact dedup, near dedup, reference matching and diversity stats."""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    """Casefold, strip punctuation, collapse whitespace: "Paris!" and " paris" are the same answer.

    Punctuation is removed, not replaced by a space, so "don't" and "dont" agree.
    """
    return " ".join(_PUNCTUATION.sub("", text.casefold()).split())


def words(text: str) -> list[str]:
    return normalize(text).split()
