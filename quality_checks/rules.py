"""Cheap rule checks: empty, truncated, refusal, length, regex. Each costs microseconds per sample."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from .base import PASS, Check, Verdict
from .registry import CheckOptions, register

if TYPE_CHECKING:
    from factory.records import Sample


@register("empty")
class Empty(Check):
    name = "empty"

    def __init__(self, options: CheckOptions | None = None) -> None:
        pass

    def __call__(self, sample: "Sample") -> Verdict:
        if not sample.text.strip():
            return Verdict(False, "empty answer")
        return PASS


@register("truncated")
class Truncated(Check):
    name = "truncated"

    def __init__(self, options: CheckOptions | None = None) -> None:
        pass

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
class Refusal(Check):
    name = "refusal"

    def __init__(self, options: CheckOptions | None = None) -> None:
        pass

    def __call__(self, sample: "Sample") -> Verdict:
        match = _REFUSAL.search(sample.text[:_REFUSAL_WINDOW])
        if match:
            return Verdict(False, f"refusal: {match.group(0)[:60]!r}")
        return PASS


class LengthOptions(CheckOptions):
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0, description="whitespace-separated words")
    max_tokens: int | None = Field(default=None, ge=1, description="whitespace-separated words")

    @model_validator(mode="after")
    def _bounds(self) -> "LengthOptions":
        bounds = (self.min_chars, self.max_chars, self.min_tokens, self.max_tokens)
        if all(bound is None for bound in bounds):
            raise ValueError("set at least one of min_chars, max_chars, min_tokens, max_tokens")
        for low, high, what in ((self.min_chars, self.max_chars, "chars"), (self.min_tokens, self.max_tokens, "tokens")):
            if low is not None and high is not None and low > high:
                raise ValueError(f"min_{what} ({low}) is larger than max_{what} ({high})")
        return self


@register("length", LengthOptions)
class Length(Check):
    """Characters of the answer, and tokens counted as whitespace-separated words.

    Words, not a tokenizer: the teacher's tokenizer is often not at hand (hosted models), a tokenizer
    costs tens of microseconds per answer, and a word count is the same for every teacher. English text
    runs about 1.3 tokenizer tokens per word.
    """

    name = "length"

    def __init__(self, options: LengthOptions) -> None:
        self.options = options
        self.count_words = options.min_tokens is not None or options.max_tokens is not None

    def __call__(self, sample: "Sample") -> Verdict:
        o = self.options
        text = sample.text
        chars = len(text)
        if o.min_chars is not None and chars < o.min_chars:
            return Verdict(False, f"too short: {chars} chars < min_chars {o.min_chars}", chars)
        if o.max_chars is not None and chars > o.max_chars:
            return Verdict(False, f"too long: {chars} chars > max_chars {o.max_chars}", chars)
        if self.count_words:
            tokens = len(text.split())
            if o.min_tokens is not None and tokens < o.min_tokens:
                return Verdict(False, f"too short: {tokens} words < min_tokens {o.min_tokens}", tokens)
            if o.max_tokens is not None and tokens > o.max_tokens:
                return Verdict(False, f"too long: {tokens} words > max_tokens {o.max_tokens}", tokens)
        return PASS


class RegexOptions(CheckOptions):
    pattern: str = Field(description="Python regular expression, searched anywhere in the answer; (?i) etc. for flags")
    mode: Literal["must_match", "must_not_match"] = "must_match"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


@register("regex", RegexOptions)
class Regex(Check):
    name = "regex"

    def __init__(self, options: RegexOptions) -> None:
        self.regex = re.compile(options.pattern)
        self.must_match = options.mode == "must_match"
        self.shown = options.pattern if len(options.pattern) <= 60 else options.pattern[:57] + "..."

    def __call__(self, sample: "Sample") -> Verdict:
        match = self.regex.search(sample.text)
        if self.must_match and match is None:
            return Verdict(False, f"does not match /{self.shown}/")
        if not self.must_match and match is not None:
            return Verdict(False, f"matches /{self.shown}/: {match.group(0)[:60]!r}")
        return PASS
