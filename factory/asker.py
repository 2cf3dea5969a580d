"""One model behind its limiter, the run's response cache, its price and the run's budget.

The pipeline asks its teacher through an Asker, and so does every check that calls a model (the LLM
judge): each request is looked up in `cache.sqlite` first, sent only when it is not there, committed
there before anything made from it is written, and counted. A request answered once is never paid
twice, whoever asked it.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from apprentice.errors import ApprenticeError
from apprentice.hashing import canonical_json
from apprentice.responses import TeacherResponse

from .cache import ResponseCache, cache_key
from .limiter import Limiter, LimiterClosed
from .pricing import Pricer
from .progress import Usage
from .recipe import IN_PROCESS
from .teachers.base import Teacher

if TYPE_CHECKING:
    from .recipe import TeacherConfig

__all__ = ["Asker", "Budget", "BudgetExhausted", "LimiterClosed", "Usage", "limiter_for"]


def limiter_for(config: "TeacherConfig", teacher: Teacher, share: float = 1.0) -> Limiter:
    """The limiter of one model as a recipe configures it (the factory's run and the serve router build theirs here).
    `share`: this process's part of limits shared with other workers (the Ray runner)."""
    # An in-process model is fed what it can batch (the recipe may ask for less); an API gets the recipe's cap.
    useful = teacher.max_useful_concurrency
    concurrency = min(config.max_concurrency or useful, useful) if useful else config.concurrency_cap
    # Slow start probes a server's limits; a model in this process has none, and starting it at 8 requests
    # would leave a continuously batching engine mostly idle for its first rounds.
    # Workers that share a limit (the Ray runner) share the probe too: W of them do not send W × 8 at once.
    initial = concurrency if config.provider in IN_PROCESS else max(1, round(8 * share))
    # A fleet's endpoints follow their own latency (teachers/fleet.py); this limiter does for one server.
    follow = config.follows_latency and config.provider not in IN_PROCESS and not isinstance(config.base_url, list)
    return Limiter(max_concurrency=concurrency, rpm=config.rpm, tpm=config.tpm, max_retries=config.max_retries,
                   initial_concurrency=initial, share=share, follow_latency=follow)


class BudgetExhausted(ApprenticeError):
    """Sending this request could exceed `budget_usd`: it was not sent."""


class Budget:
    """`factory.budget_usd`, shared by every model the run pays. A request reserves its worst case
    (estimated input, max_tokens out) until its usage is known, so concurrent requests cannot overshoot."""

    def __init__(self, limit_usd: float | None, usages: Iterable[Any]) -> None:
        self.limit = limit_usd
        self.usages = list(usages)
        self.reserved = 0.0

    def reserve(self, worst_usd: float) -> None:
        if self.limit is not None:
            spent = sum(usage.cost_usd for usage in self.usages)
            if spent + self.reserved + worst_usd > self.limit:
                raise BudgetExhausted()
        self.reserved += worst_usd

    def release(self, worst_usd: float) -> None:
        self.reserved -= worst_usd


class Asker:
    def __init__(self, teacher: Teacher, config: "TeacherConfig", limiter: Limiter, cache: ResponseCache,
                 pricer: Pricer, usage: Any, budget: Budget) -> None:
        self.teacher = teacher
        self.config = config
        self.limiter = limiter
        self.cache = cache
        self.pricer = pricer
        self.usage = usage  # a Usage, or the run's Counters for the teacher
        self.budget = budget
        self.context_chars = sum(len(m["content"]) for m in config.context or ())
        self._in_flight: dict[str, asyncio.Future] = {}

    def build(self, messages: list[dict[str, str]], n: int = 1) -> dict[str, Any]:
        """The exact body for `messages` (after the config's context) asking for `n` completions."""
        return self.teacher.build_request(self.config.with_context(messages), n)

    async def ask(self, body: dict[str, Any], *, chars: int, outputs: int = 1, index: int = 0,
                  body_json: str | None = None, max_tokens: int | None = None,
                  with_context: bool = True) -> tuple[TeacherResponse, float]:
        """The answer to `body` and what it cost when it was paid for: from the cache, from the same request
        already in flight, or sent through the limiter and committed to the cache. `chars` (of the messages)
        sizes the token reservation, with the config's context added unless the body was built without it
        (`with_context=False`); `max_tokens` per output when the body asks for other than the config's.

        Raises TeacherError after retries, LimiterClosed when the run is stopping, BudgetExhausted."""
        key = cache_key(body_json if body_json is not None else canonical_json(body), index)
        cached = self.cache.get(key)
        if cached is not None:
            self.usage.cache_hits += 1
            return TeacherResponse.from_cache(cached[0]), cached[1]
        asked = self._in_flight.get(key)
        if asked is not None:  # the same request is on its way (two equal answers judged at once): wait for it
            answer = await asyncio.shield(asked)
            self.usage.cache_hits += 1
            return answer
        if self.limiter.closed:
            raise LimiterClosed()
        asked = self._in_flight[key] = asyncio.get_running_loop().create_future()
        try:
            answer = await self._send(key, body, chars + (self.context_chars if with_context else 0),
                                      (max_tokens or self.config.max_tokens) * outputs)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                asked.cancel()
            else:
                asked.set_exception(exc)
                asked.exception()  # retrieved: nobody may be waiting
            raise
        else:
            asked.set_result(answer)
        finally:
            del self._in_flight[key]
        return answer

    async def _send(self, key: str, body: dict[str, Any], chars: int, max_out: int) -> tuple[TeacherResponse, float]:
        return await self._paid(lambda: self.teacher.complete(body), chars, max_out, key)

    async def read(self, call: Callable[[], Awaitable[TeacherResponse]], *, chars: int,
                   max_tokens: int | None = None, outputs: int = 1) -> tuple[TeacherResponse, float]:
        """An answer that `call` reads as it comes (a streamed one, passed on as it arrives): limited, retried
        (while `call` raises a retryable TeacherError), budgeted and priced like `ask`; never cached.

        Raises TeacherError after retries, LimiterClosed when the run is stopping, BudgetExhausted."""
        if self.limiter.closed:
            raise LimiterClosed()
        return await self._paid(call, chars + self.context_chars, (max_tokens or self.config.max_tokens) * outputs)

    async def _paid(self, call: Callable[[], Awaitable[TeacherResponse]], chars: int, max_out: int,
                    key: str | None = None) -> tuple[TeacherResponse, float]:
        """Sent through the limiter within the budget, priced and counted; committed to the cache under `key`."""
        est_in = self.limiter.estimate_tokens(chars)
        worst = self.pricer.worst(est_in, max_out)
        self.budget.reserve(worst)
        try:
            response, _ = await self.limiter.run(call, input_tokens=est_in, output_tokens=max_out)
        finally:
            self.budget.release(worst)
        cost = self.pricer.cost_of(response)
        if key is not None:
            self.cache.put(key, response.to_cache(), cost)
        self.limiter.calibrate(chars, response.input_tokens)
        self.usage.count(response, cost)
        return response, cost
