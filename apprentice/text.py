"""Text normalisers and word-level similarity, named for what they do.

Two rules, one built on the other:

- `fold_text`: casefold, delete punctuation, collapse whitespace. Near-duplicate and exact-duplicate
  hashing (`exact_dup`, `near_dup`) and the diversity stats use it; it keeps articles, so "a cat" and
  "cat" are different texts to dedup. Changing it would change the dedup hashes of existing runs.
- `fold_answer`: `fold_text` after Unicode NFKC, with the English articles a / an / the dropped: the rule
  of the official SQuAD v1.1 script (which deletes punctuation too) made Unicode-aware. Whenever an
  answer is compared with a reference, it is the one rule: the factory's `reference` check (`normalized`
  and `contains`), eval's `normalized`, `token_f1` and `rouge_l` metrics and its agreement figure, and
  self-instruct's ROUGE-L between prompts. So the factory and the eval judge an answer the same way.

Punctuation is deleted, not replaced by a space, so "don't", "don’t" and "dont" are one word (and so are
"3.5" and "35"; a reference should not hinge on punctuation). NFKC folds compatibility forms
(fullwidth "Ｐａｒｉｓ", the ligature "ﬁ", a non-breaking space) into their plain letters.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_PUNCTUATION = re.compile(r"[^\w\s]+")
_ARTICLES = frozenset({"a", "an", "the"})


def fold_text(text: str) -> str:
    """Casefold, strip punctuation, collapse whitespace: "Paris!" and " paris" are the same text.

    Punctuation is removed, not replaced by a space, so "don't" and "dont" agree.
    """
    return " ".join(_PUNCTUATION.sub("", text.casefold()).split())


def fold_words(text: str) -> list[str]:
    return fold_text(text).split()


def answer_words(text: str) -> list[str]:
    """The words `fold_answer` keeps, in order (token F1 and ROUGE-L count these)."""
    return [word for word in fold_text(unicodedata.normalize("NFKC", text)).split() if word not in _ARTICLES]


def fold_answer(text: str) -> str:
    """An answer as compared with a reference: NFKC, casefold, punctuation deleted, articles dropped.

    "The Paris!" and "paris" agree; "Don’t" and "dont" agree; "Paris, France" and "Paris" do not.
    """
    return " ".join(answer_words(text))


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
