"""A teacher's answer as every layer sees it: the choices, the usage, the headers for the limiter.

Shared vocabulary: teachers make a TeacherResponse, the limiter reads its headers, the cache stores it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Mapping

from .tokens import TokenLogprobs, logprobs_from_json, logprobs_to_json


@dataclass(slots=True)
class Choice:
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # only when the recipe asks for teacher.logprobs


@dataclass(slots=True)
class TeacherResponse:
    choices: list[Choice]
    input_tokens: int   # every input token the model read, the cached ones included (OpenAI's prompt_tokens)
    output_tokens: int
    # Of input_tokens, those read from the provider's prompt cache and those written to it: they are billed
    # at their own prices (OpenAI cached input at a share of the input price, Anthropic reads at ~0.1x and
    # writes at ~1.25x). Anthropic reports its usage.input_tokens without them; the teacher adds them back.
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    # Response headers (lower-case names) for the limiter; never cached, never written to disk.
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_cache(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "choices": [[c.text, c.finish_reason] for c in self.choices],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        # Only when there are any, so that entries without prompt caching stay byte-identical; entries written
        # before these fields existed load with zero.
        if self.cached_input_tokens:
            data["cached_input_tokens"] = self.cached_input_tokens
        if self.cache_write_tokens:
            data["cache_write_tokens"] = self.cache_write_tokens
        # Logprobs are cached with the answer they belong to: a resumed run that takes the answer from the
        # cache must still be able to write the record's sidecar entry. Absent when not asked for, so the
        # cache entries of runs without logprobs stay byte-identical.
        if any(c.logprobs is not None for c in self.choices):
            data["logprobs"] = [logprobs_to_json(c.logprobs) if c.logprobs is not None else None
                                for c in self.choices]
        return data

    @classmethod
    def from_cache(cls, data: Mapping[str, Any]) -> "TeacherResponse":
        logprobs: list[Any] = list(data.get("logprobs") or [])
        if logprobs:
            logprobs = [logprobs_from_json(item) if item is not None else None for item in logprobs]
        logprobs += [None] * (len(data["choices"]) - len(logprobs))
        return cls(
            choices=[Choice(text, reason, lp) for (text, reason), lp in zip(data["choices"], logprobs)],
            input_tokens=data["input_tokens"],
            output_tokens=data["output_tokens"],
            cached_input_tokens=data.get("cached_input_tokens", 0),
            cache_write_tokens=data.get("cache_write_tokens", 0),
        )

    def usage(self) -> dict[str, int]:
        """Token counts for a record's `usage`: the cache counts only when the provider reported any."""
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cached_input_tokens:
            usage["cached_input_tokens"] = self.cached_input_tokens
        if self.cache_write_tokens:
            usage["cache_write_tokens"] = self.cache_write_tokens
        return usage


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
