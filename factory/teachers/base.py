"""The Teacher protocol: what every backend implements.

A backend does two things: it turns a conversation into the exact request body it will send
(that body is what the cache keys on), and it sends one body and returns the answer. Retries,
rate limits, caching, checks and storage belong to the engine and the limiter, never to a backend.
The types a backend returns and raises are the shared vocabulary: apprentice.responses, apprentice.errors.
"""
from __future__ import annotations

from typing import Any, Protocol

from apprentice.responses import TeacherResponse


class Teacher(Protocol):
    provider: str
    model: str
    # True when one request can return n completions (OpenAI's `n`, local num_return_sequences).
    supports_n: bool
    # Upper bound on useful concurrency for this backend (a local model batches; an API does not care).
    max_useful_concurrency: int | None
    # Seconds an in-process model took to load (None for an API, or before it loaded): part of the run's time.
    load_s: float | None
    # True when it also has `async stream(body, on_text) -> TeacherResponse`: the answer's text passed on as it
    # arrives (the serve router's streamed responses); an in-process model answers whole.
    can_stream: bool

    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        """The exact body that will be sent for `messages` asking for `n` completions."""
        ...

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        """Send one body; raise TeacherError on failure."""
        ...

    async def aclose(self) -> None: ...
