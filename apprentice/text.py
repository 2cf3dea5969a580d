"""Text normalisers and word-level similarity, named for what they do.

`fold_text` is the factory's rule (dedup, reference matching, diversity stats); `squad_text` is eval's
SQuAD-style rule (it also drops articles). They differ on purpose today; each caller names the one it uses.
"""
from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

_PUNCTUATION = re.compile(r"[^\w\s]+")
_ASCII_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def fold_text(text: str) -> str:
    """Casefold, strip punctuation, collapse whitespace: "Paris!" and " paris" are the same answer.

    Punctuation is removed, not replaced by a space, so "don't" and "dont" agree.
    """
    return " ".join(_PUNCTUATION.sub("", text.casefold()).split())


def fold_words(text: str) -> list[str]:
    return fold_text(text).split()


def squad_text(text: str) -> str:
    """SQuAD-style: NFKC, casefold, punctuation to spaces, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _ASCII_PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_words(pred: Sequence[str], gold: Sequence[str]) -> float:
    """ROUGE-L F1 of two word lists already normalized (to compare one text with many, normalize once)."""
    if not pred or not gold:
        return float(pred == gold)
    lcs = lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)
