"""A model the router asks: one factory teacher behind the factory's asker (its limiter, retries, pricing and
budget), without the response cache (a served request samples anew, as a client expects).

The student's confidence is read here, with the eval's measure (`apprentice.tokens.mean_logprob`).

`stream` passes a backend's answer on as it arrives (an OpenAI-compatible server: the teacher's `can_stream`),
through the same asker: a failure before any text was passed on is retried and then a BackendDown like any
other; after, it is StreamBroken, carrying what was passed on (the client holds it: no retry, no fallback).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from apprentice.errors import ApprenticeError, TeacherError
from apprentice.responses import TeacherResponse
from apprentice.tokens import mean_logprob
from factory.asker import Asker, Budget, limiter_for
from factory.pricing import pricer_for
from factory.progress import Usage
from factory.recipe import IN_PROCESS, TeacherConfig
from factory.teachers import make_teacher


class BackendDown(ApprenticeError):
    """A backend gave no answer (an error after its retries, a spent budget, an open circuit)."""


class StreamBroken(BackendDown):
    """A streamed answer failed after part of it was passed on; `texts`: each choice's text passed on."""

    def __init__(self, message: str, texts: list[str]) -> None:
        super().__init__(message)
        self.texts = texts


def _key_json(body: dict[str, Any]) -> str | None:
    """What the asker keys a request on, to join an identical one in flight; with no cache behind it, any stable
    encoding does: orjson's, a tenth of canonical_json's 6 µs. None (canonical_json) for what orjson refuses."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return None


class NoCache:
    """The asker's cache, switched off: two clients asking the same question each get their own sample."""

    def get(self, key: str) -> None:
        return None

    def put(self, key: str, response: dict[str, Any], cost_usd: float) -> None:
        pass


@dataclass(slots=True)
class Answer:
    texts: list[str]
    finish_reasons: list[str | None]
    confidences: list[float | None]
    usage: dict[str, int] = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def confidence(self) -> float | None:
        """The least confident choice's: the cascade routes a request when any of its answers is unsure."""
        known = [value for value in self.confidences if value is not None]
        return min(known) if known else None


class Backend:
    def __init__(self, name: str, config: TeacherConfig, budget_usd: float | None = None) -> None:
        self.name = name
        self.config = config
        self.teacher = make_teacher(config)
        wire = getattr(self.teacher, "wire", None)  # hosted-style teachers: the lean client to a plain http:// backend
        if wire is not None:
            wire.prefer_http1()
        self.limiter = limiter_for(config, self.teacher)
        pricer, _ = pricer_for(config, budget_usd, f"serve.{name}")
        self.usage = Usage()
        self.asker = Asker(self.teacher, config, self.limiter, NoCache(), pricer, self.usage,  # type: ignore[arg-type]
                           Budget(budget_usd, [self.usage]))
        self.stop_row = config.provider in IN_PROCESS  # in-process models' logprobs hold the end-of-turn token

    @property
    def can_stream(self) -> bool:
        return self.teacher.can_stream

    @property
    def down(self) -> bool:
        """The limiter's circuit is open after consecutive failures: fall back at once instead of waiting."""
        return self.limiter.breaker_open

    def body(self, messages: list[dict[str, str]], n: int, max_tokens: int | None,
             sampling: dict[str, Any]) -> dict[str, Any]:
        body = self.asker.build(messages, n)
        if max_tokens is not None:
            body[next((k for k in ("max_completion_tokens", "max_new_tokens") if k in body), "max_tokens")] = max_tokens
        body.update(sampling)
        return body

    async def answer(self, messages: list[dict[str, str]], n: int = 1, max_tokens: int | None = None,
                     sampling: dict[str, Any] | None = None) -> Answer:
        """The backend's answer with `n` choices; raises BackendDown with the reason."""
        if self.down:
            raise BackendDown(f"{self.name}: circuit open after repeated failures")
        start = time.perf_counter()
        chars = sum(len(m["content"]) for m in messages)
        asks = [(n, 0)] if n == 1 or self.teacher.supports_n else [(1, i) for i in range(n)]
        try:
            if len(asks) == 1:  # most requests: awaited here, not wrapped in a task by gather (one less per answer)
                body = self.body(messages, n, max_tokens, sampling or {})
                replies = [await self.asker.ask(body, chars=chars, outputs=n, max_tokens=max_tokens,
                                                body_json=_key_json(body))]
            else:
                replies = await asyncio.gather(*(
                    self.asker.ask(self.body(messages, k, max_tokens, sampling or {}), chars=chars, outputs=k,
                                   index=index, max_tokens=max_tokens) for k, index in asks))
        except TeacherError as exc:
            raise BackendDown(f"{self.name}: {exc}") from None
        except ApprenticeError as exc:  # a spent budget, a closed limiter
            raise BackendDown(f"{self.name}: {type(exc).__name__} {exc}".rstrip()) from None
        return self._answer(replies, start)

    async def stream(self, messages: list[dict[str, str]], n: int, max_tokens: int | None,
                     sampling: dict[str, Any] | None, on_text: Callable[[int, str], Awaitable[None]]) -> Answer:
        """The backend's answer, each piece of text passed to `on_text(choice, text)` as it arrives; raises
        BackendDown when nothing was passed on, StreamBroken when some was."""
        if self.down:
            raise BackendDown(f"{self.name}: circuit open after repeated failures")
        start = time.perf_counter()
        body = self.body(messages, n, max_tokens, sampling or {})
        passed: dict[int, list[str]] = {}

        async def pass_on(index: int, text: str) -> None:
            passed.setdefault(index, []).append(text)
            await on_text(index, text)

        async def read() -> TeacherResponse:
            try:
                return await self.teacher.stream(body, pass_on)
            except TeacherError as exc:
                if passed:  # the client holds part of this answer: asking again would send it twice
                    raise TeacherError(str(exc), retryable=False, status=exc.status) from None
                raise

        try:
            reply = await self.asker.read(read, chars=sum(len(m["content"]) for m in messages),
                                          max_tokens=max_tokens, outputs=n)
        except TeacherError as exc:
            if passed:
                texts = ["".join(passed.get(i, ())) for i in range(max(passed) + 1)]
                raise StreamBroken(f"{self.name}: {exc}", texts) from None
            raise BackendDown(f"{self.name}: {exc}") from None
        except ApprenticeError as exc:  # a spent budget, a closed limiter
            raise BackendDown(f"{self.name}: {type(exc).__name__} {exc}".rstrip()) from None
        return self._answer([reply], start)

    def _answer(self, replies: list[tuple[TeacherResponse, float]], start: float) -> Answer:
        answer = Answer([], [], [], latency_s=time.perf_counter() - start)
        totals = {"input_tokens": 0, "output_tokens": 0}
        for response, _ in replies:
            for choice in response.choices:
                answer.texts.append(choice.text)
                answer.finish_reasons.append(choice.finish_reason)
                answer.confidences.append(mean_logprob(choice.logprobs, choice.finish_reason, stop_row=self.stop_row))
            totals["input_tokens"] = max(totals["input_tokens"], response.input_tokens)
            totals["output_tokens"] += response.output_tokens
        answer.usage = totals
        return answer

    async def warm(self) -> None:
        """One short answer, so that a model that cannot load fails here and not on a client's request."""
        await self.answer([{"role": "user", "content": "Hi"}], max_tokens=1)

    async def aclose(self) -> None:
        self.limiter.close()
        await self.teacher.aclose()
