"""A fleet of OpenAI-compatible servers behind one teacher: `teacher.base_url: [URL, URL, ...]`.

    teacher:
      provider: openai
      model: meta-llama/Llama-3.1-70B-Instruct
      base_url: [http://gpu-a:8000/v1, http://gpu-b:8000/v1, http://gpu-c:8000/v1]

Every request goes to the live endpoint with the fewest requests outstanding. Each endpoint has its own
limiter: the rate limits its headers describe, its pacing, and a circuit breaker that opens after a few
failures in a row, so a dead server is drained (no new requests) and tried again after a cooldown. A
request that fails on one endpoint (a dropped connection, a 5xx, a 429) is sent to another before the
run's own limiter sees a failure: the body is the same wherever it goes, so the cache keys on it as for one
server and an answer is never paid twice. The run's limiter keeps the retries, the budget and the total
concurrency (`max_concurrency` is for the fleet); the endpoints' headers stay with their endpoint. Each
endpoint's concurrency also follows its latency (`follow_latency`, on by default here: factory/latency.py), so
a server that queues is sent what it can serve and the rest go to the others.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from apprentice.errors import TeacherError
from apprentice.responses import TeacherResponse

from ..limiter import Limiter
from ..recipe import TeacherConfig
from .openai import OpenAITeacher

BREAKER_FAILURES = 3     # failures in a row that take an endpoint out
BREAKER_COOLDOWN_S = 5.0  # before one request tries it again


@dataclass
class Endpoint:
    url: str
    teacher: OpenAITeacher
    limiter: Limiter
    outstanding: int = 0
    answered: int = 0
    failed: int = 0

    def down(self, now: float) -> bool:
        return self.limiter.breaker_open and self.limiter.pause_until > now


class FleetTeacher:
    provider = "openai"
    supports_n = True
    can_stream = False  # answers whole (see base.Teacher.can_stream)
    max_useful_concurrency = None
    load_s = None  # nothing loads in this process

    def __init__(self, config: TeacherConfig, rate_share: float = 1.0) -> None:
        assert isinstance(config.base_url, list)
        self.model = config.model
        self.endpoints = [
            Endpoint(url, OpenAITeacher(config.model_copy(update={"base_url": url})),
                     Limiter(max_concurrency=config.concurrency_cap, rpm=config.rpm, tpm=config.tpm, max_retries=0,
                             breaker_threshold=BREAKER_FAILURES, breaker_cooldown_s=BREAKER_COOLDOWN_S,
                             share=rate_share,
                             follow_latency=config.follows_latency))
            for url in config.base_url
        ]
        self.max_tokens = config.max_tokens

    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        """The same body for every endpoint: the URL is not in it, so neither is it in the cache key."""
        return self.endpoints[0].teacher.build_request(messages, n)

    def logprobs_meta(self) -> dict[str, Any]:
        return self.endpoints[0].teacher.logprobs_meta()

    def _order(self) -> list[Endpoint]:
        """Live endpoints, fewest outstanding first; then those taken out, the soonest back first."""
        now = time.monotonic()
        live = sorted((e for e in self.endpoints if not e.down(now)), key=lambda e: e.outstanding)
        out = sorted((e for e in self.endpoints if e.down(now)), key=lambda e: e.limiter.pause_until)
        return live + out

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        """Send to the best endpoint; on a failure another may answer: a run fails a request only when
        every endpoint failed it (or when the failure is the request's own fault, a 400, or a fatal one)."""
        chars = sum(len(str(message.get("content", ""))) for message in body.get("messages", ()))
        reserved_out = int(body.get("max_tokens") or self.max_tokens) * int(body.get("n") or 1)
        last: TeacherError | None = None
        for endpoint in self._order():
            endpoint.outstanding += 1
            try:
                response, _ = await endpoint.limiter.run(lambda: endpoint.teacher.complete(body),
                                                         input_tokens=endpoint.limiter.estimate_tokens(chars),
                                                         output_tokens=reserved_out)
            except TeacherError as error:
                endpoint.failed += 1
                if not error.retryable or error.fatal:
                    raise TeacherError(f"{endpoint.url}: {error}", retryable=error.retryable,
                                       status=error.status) from None
                last = error.prefixed(endpoint.url)
                continue
            finally:
                endpoint.outstanding -= 1
            endpoint.answered += 1
            # The endpoint's limiter has read its headers; the run's limiter must not mix several servers' limits.
            return TeacherResponse(response.choices, response.input_tokens, response.output_tokens,
                                   cached_input_tokens=response.cached_input_tokens,
                                   cache_write_tokens=response.cache_write_tokens)
        assert last is not None
        # Every endpoint failed it: a server error for the run's limiter to retry after a backoff (not a
        # 429 with one server's headers, which would pause every request of the fleet).
        raise TeacherError(f"every endpoint failed this request; the last: {last}", retryable=True,
                           status=last.status if last.status != 429 else 503) from None

    def summary(self) -> list[dict[str, Any]]:
        return [{"url": e.url, "answered": e.answered, "failed": e.failed,
                 "breaker_opened": e.limiter.stats.breaker_opened,
                 "concurrency": e.limiter._window()} for e in self.endpoints]

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.teacher.aclose()
