"""The Teacher protocol and the types every backend shares.

A backend does two things: it turns a conversation into the exact request body it will send
(that body is what the cache keys on), and it sends one body and returns the answer. Retries,
rate limits, caching, checks and storage belong to the pipeline and the limiter, never to a backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol


@dataclass(slots=True)
class Choice:
    text: str
    finish_reason: str | None


@dataclass(slots=True)
class TeacherResponse:
    choices: list[Choice]
    input_tokens: int
    output_tokens: int
    # Response headers (lower-case names) for the limiter; never cached, never written to disk.
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_cache(self) -> dict[str, Any]:
        return {
            "choices": [[c.text, c.finish_reason] for c in self.choices],
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }

    @classmethod
    def from_cache(cls, data: Mapping[str, Any]) -> "TeacherResponse":
        return cls(
            choices=[Choice(text, reason) for text, reason in data["choices"]],
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
