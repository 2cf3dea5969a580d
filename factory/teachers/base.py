"""The Teacher protocol and the types every backend shares.

A backend does two things: it turns a conversation into the exact request body it will send
(that body is what the cache keys on), and it sends one body and returns the answer. Retries,
rate limits, caching, checks and storage belong to the pipeline and the limiter, never to a backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol


@dataclass(slots=True)
class TokenLogprobs:
    """The teacher's logprobs for one completion: one row per generated token, the stop token included
    when the teacher emitted one (a student must learn to stop too).

    Arrays are numpy (float32 / int32). `top_*` rows hold the k most likely tokens, best first; a row
    with fewer than k alternatives is padded with logprob -inf (id -1, token ""). Ids are None where the
    server returned token strings only (hosted OpenAI); strings are None where the teacher gave ids only
    (the local provider), because a string is then just `tokenizer.decode([id])`.
    """

    sampled_logprobs: Any                  # float32 [T]
    top_logprobs: Any                      # float32 [T, k]
    sampled_ids: Any = None                # int32 [T]
    top_ids: Any = None                    # int32 [T, k]
    tokens: list[str] | None = None        # [T]
    top_tokens: list[list[str]] | None = None  # [T][k]

    def __len__(self) -> int:
        return len(self.sampled_logprobs)


@dataclass(slots=True)
class Choice:
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # only when the recipe asks for teacher.logprobs


@dataclass(slots=True)
class TeacherResponse:
    choices: list[Choice]
    input_tokens: int
    output_tokens: int
    # Response headers (lower-case names) for the limiter; never cached, never written to disk.
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_cache(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "choices": [[c.text, c.finish_reason] for c in self.choices],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        # Logprobs are cached with the answer they belong to: a resumed run that takes the answer from the
        # cache must still be able to write the record's sidecar entry. Absent when not asked for, so the
        # cache entries of runs without logprobs stay byte-identical.
        if any(c.logprobs is not None for c in self.choices):
            from ..logprobs import logprobs_to_json

            data["logprobs"] = [logprobs_to_json(c.logprobs) if c.logprobs is not None else None
                                for c in self.choices]
        return data

    @classmethod
    def from_cache(cls, data: Mapping[str, Any]) -> "TeacherResponse":
        logprobs: list[Any] = list(data.get("logprobs") or [])
        if logprobs:
            from ..logprobs import logprobs_from_json

            logprobs = [logprobs_from_json(item) if item is not None else None for item in logprobs]
        logprobs += [None] * (len(data["choices"]) - len(logprobs))
        return cls(
            choices=[Choice(text, reason, lp) for (text, reason), lp in zip(data["choices"], logprobs)],
            input_tokens=data["input_tokens"],
            output_tokens=data["output_tokens"],
        )


class TeacherError(Exception):
    """A request that did not produce an answer.

    `retryable` says whether the same request may succeed later (429, 5xx, timeouts, dropped
    connections). `retry_after` is the server's word in seconds, when it gave one. `rate_limited`
    marks a 429 so the limiter can back off all requests, not just this one.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        rate_limited: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.rate_limited = rate_limited
        self.headers = headers or {}


class Teacher(Protocol):
    provider: str
    model: str
    # True when one request can return n completions (OpenAI's `n`, local num_return_sequences).
    supports_n: bool
    # Upper bound on useful concurrency for this backend (a local model batches; an API does not care).
    max_useful_concurrency: int | None

    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        """The exact body that will be sent for `messages` asking for `n` completions."""
        ...

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        """Send one body; raise TeacherError on failure."""
        ...

    async def aclose(self) -> None: ...


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
    from email.utils import parsedate_to_datetime
    import time

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
