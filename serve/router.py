"""Who answers a request, and what is written about it.

`cascade`: the student answers; when its confidence is below `routing.threshold` the teacher answers instead.
`canary`: that share goes to the teacher regardless. `shadow`: that share is also asked of the model that did not
answer, off the response path (a task started after the answer is logged), and the two answers compared with
the eval's normaliser (`fold_answer`), and by the shadow judge where one is configured (serve/judge.py).
Faults: the teacher fails or its budget is spent → the student's answer is served and marked; the student
fails → the teacher answers; both fail → AllDown (the server's 503).

Every answer is logged (factory/served_log.py) before it is returned, so before the client sees it.

Streamed requests (`stream`): where the route is known before the answer (modes `student` and `teacher`, a
canary), the answer is passed on as the backend sends it (an OpenAI-compatible server; an in-process model
answers whole) and logged once it is complete, before the stream's end is sent. The cascade and the learned
router read the student's whole answer first, so theirs is streamed once known. A backend that fails before
any text was passed on falls back as above; one that fails after is StreamBroken: the part passed on is logged
with its fault, and the client's stream ends with an error.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable

from apprentice.errors import ApprenticeError
from apprentice.text import fold_answer
from factory.served_log import ServedLog

from .backends import Answer, Backend, BackendDown, StreamBroken
from .config import ServeConfig
from .judge import JudgeFailed, JudgeSpent, ShadowJudge
from .learned import LearnedRouter
from .metrics import Metrics


class AllDown(ApprenticeError):
    """Neither model could answer."""


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    n: int = 1
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Served:
    id: str
    answer: Answer
    answered_by: str       # student | teacher
    route: str             # student | teacher | cascade | learned | canary | fallback
    student_confidence: float | None
    fault: str | None      # why the answer is not the one the routing chose


@dataclass(slots=True)
class Opening:
    """What a streamed response's headers say, known when its first text is passed on."""
    id: str
    answered_by: str
    route: str
    fault: str | None


Forward = Callable[[Opening, int, str], Awaitable[None]]  # (opening, choice index, text) as it arrives


class Router:
    def __init__(self, config: ServeConfig, student: Backend, teacher: Backend | None, log: ServedLog,
                 metrics: Metrics, rng: random.Random | None = None,
                 warn: Callable[[str], None] | None = None, learned: LearnedRouter | None = None,
                 judge: ShadowJudge | None = None) -> None:
        self.config = config
        self.routing = config.routing
        self.student = student
        self.teacher = teacher
        self.log = log
        self.metrics = metrics
        self.rng = rng or random.Random(config.routing.seed)
        self.warn = warn or (lambda message: None)
        self.learned = learned
        self.judge = judge
        self.shadow_tasks: set[asyncio.Task] = set()

    async def _ask(self, backend: Backend, request: ChatRequest,
                   on_text: Callable[[int, str], Awaitable[None]] | None = None) -> Answer:
        """The backend's answer; with `on_text`, passed on as it arrives where the backend streams."""
        start = time.perf_counter()
        try:
            if on_text is not None and backend.can_stream:
                answer = await backend.stream(request.messages, request.n, request.max_tokens, request.sampling,
                                              on_text)
            else:
                answer = await backend.answer(request.messages, request.n, request.max_tokens, request.sampling)
        except BackendDown:
            self.metrics.backend(backend.name, time.perf_counter() - start, ok=False)
            raise
        self.metrics.backend(backend.name, answer.latency_s, ok=True)
        if backend is self.student:
            self.metrics.student_confidence(answer.confidence)
        return answer

    async def complete(self, request: ChatRequest) -> Served:
        """The answer to one request, logged; raises AllDown when neither model answers."""
        canary, shadow = self._draw()
        served = await self._route(request, canary)
        self._finish(request, served, shadow)
        return served

    async def stream(self, request: ChatRequest, forward: Forward) -> Served:
        """The answer to one streamed request, logged once whole; its text is passed to `forward` as it arrives
        where the route is known before the answer. Raises AllDown, or StreamBroken once the part is logged."""
        canary, shadow = self._draw()
        if canary or self.routing.mode in ("student", "teacher"):
            served = await self._route_streamed(request, canary, forward)
        else:  # the cascade and the learned router need the student's whole answer
            served = await self._route(request, canary)
        self._finish(request, served, shadow)
        return served

    def _draw(self) -> tuple[bool, bool]:
        """(canary?, shadow?) for one request, drawn in this order."""
        canary = self.teacher is not None and self.rng.random() < self.routing.canary
        shadow = self.teacher is not None and self.rng.random() < self.routing.shadow
        return canary, shadow

    def _finish(self, request: ChatRequest, served: Served, shadow: bool) -> None:
        self._write(request, served)
        self.metrics.answered(served.answered_by, served.route)
        if served.fault:
            self.metrics.fallback(served.fault.split(":", 1)[0])
        if shadow:
            task = asyncio.get_running_loop().create_task(self._shadow(request, served))
            self.shadow_tasks.add(task)
            task.add_done_callback(self.shadow_tasks.discard)

    async def _route(self, request: ChatRequest, canary: bool) -> Served:
        request_id = uuid.uuid4().hex
        mode = self.routing.mode
        if canary or mode == "teacher":
            return await self._teacher_first(request_id, request, "canary" if canary else "teacher")
        try:
            mine = await self._ask(self.student, request)
        except BackendDown as down:
            if self.teacher is None:
                raise AllDown(f"the student is down ({down}) and no teacher is configured") from None
            return await self._teacher_only(request_id, request, "fallback", f"student_down: {down}")
        confidence = mine.confidence
        unsure, fault = await self._unsure(request, mine)
        if not unsure:
            return Served(request_id, mine, "student", "student", confidence, fault)
        assert self.teacher is not None  # the config requires a teacher for modes cascade and learned
        try:
            theirs = await self._ask(self.teacher, request)
        except BackendDown as down:
            return Served(request_id, mine, "student", mode, confidence, f"teacher_down: {down}")
        return Served(request_id, theirs, "teacher", mode, confidence, None)

    async def _route_streamed(self, request: ChatRequest, canary: bool, forward: Forward) -> Served:
        """Modes student and teacher, and a canary: the first model streams; when it fails before any text was
        passed on, the other one does (the same faults as `_route`)."""
        request_id = uuid.uuid4().hex
        teacher_first = canary or self.routing.mode == "teacher"
        route = "canary" if canary else self.routing.mode
        first, second = (self.teacher, self.student) if teacher_first else (self.student, self.teacher)
        assert first is not None  # the config requires a teacher for mode teacher and a canary
        opening = Opening(request_id, first.name, route, None)
        try:
            answer = await self._streamed(first, request, forward, opening)
        except StreamBroken:  # the client holds part of this answer: no other model's
            raise
        except BackendDown as down:
            if second is None:
                raise AllDown(f"the student is down ({down}) and no teacher is configured") from None
            opening = Opening(request_id, second.name, route if teacher_first else "fallback",
                              f"{first.name}_down: {down}")
            try:
                answer = await self._streamed(second, request, forward, opening)
            except StreamBroken:
                raise
            except BackendDown as other:
                raise AllDown(f"both models are down: {down}; {other}") from None
        confidence = answer.confidence if opening.answered_by == "student" else None
        return Served(request_id, answer, opening.answered_by, opening.route, confidence, opening.fault)

    async def _streamed(self, backend: Backend, request: ChatRequest, forward: Forward, opening: Opening) -> Answer:
        """One backend's answer passed on as it arrives; a stream broken halfway is logged, then raised."""
        try:
            return await self._ask(backend, request, lambda index, text: forward(opening, index, text))
        except StreamBroken as broken:
            texts = broken.texts or [""]
            answer = Answer(texts, [None] * len(texts), [None] * len(texts))
            fault = f"stream_broken: {broken}" + (f" (after {opening.fault})" if opening.fault else "")
            self._write(request, Served(opening.id, answer, opening.answered_by, opening.route, None, fault))
            self.metrics.answered(opening.answered_by, opening.route)
            self.metrics.fallback("stream_broken")
            raise

    async def _unsure(self, request: ChatRequest, mine: Answer) -> tuple[bool, str | None]:
        """Whether the router sends this request on to the teacher (modes cascade and learned), and the fault when
        it could not tell."""
        confidence = mine.confidence
        if confidence is None:
            return False, None
        if self.routing.mode == "cascade":
            return self.routing.threshold is not None and confidence < self.routing.threshold, None
        if self.routing.mode == "learned" and self.learned is not None:
            try:
                agreement = await self.learned.agreement_served(request.messages, mine.texts[0], confidence)
            except Exception as exc:  # the embedding model failed (torch, memory): the student's answer, marked
                return False, f"embedding_failed: {type(exc).__name__}: {exc}"
            return agreement < self.routing.min_agreement, None
        return False, None

    async def _teacher_first(self, request_id: str, request: ChatRequest, route: str) -> Served:
        assert self.teacher is not None
        try:
            theirs = await self._ask(self.teacher, request)
        except BackendDown as down:
            try:
                mine = await self._ask(self.student, request)
            except BackendDown as student_down:
                raise AllDown(f"both models are down: {down}; {student_down}") from None
            return Served(request_id, mine, "student", route, mine.confidence, f"teacher_down: {down}")
        return Served(request_id, theirs, "teacher", route, None, None)

    async def _teacher_only(self, request_id: str, request: ChatRequest, route: str, fault: str) -> Served:
        assert self.teacher is not None
        try:
            theirs = await self._ask(self.teacher, request)
        except BackendDown as down:
            raise AllDown(f"both models are down: {fault.split(': ', 1)[1]}; {down}") from None
        return Served(request_id, theirs, "teacher", route, None, fault)

    def _write(self, request: ChatRequest, served: Served) -> None:
        answer = served.answer
        record: dict[str, Any] = {
            "id": served.id, "time": round(time.time(), 3), "prompt": request.messages,
            "completion": [{"role": "assistant", "content": answer.texts[0]}],
            "answered_by": served.answered_by, "route": served.route, "confidence": answer.confidence,
            "student_confidence": served.student_confidence, "latency_ms": round(answer.latency_s * 1000, 3),
            "usage": answer.usage, "finish_reason": answer.finish_reasons[0], "fault": served.fault,
        }
        if len(answer.texts) > 1:
            record["choices"] = answer.texts
        self.log.write(record)

    async def _shadow(self, request: ChatRequest, served: Served) -> None:
        other = self.student if served.answered_by == "teacher" else self.teacher
        assert other is not None
        single = ChatRequest(request.messages, 1, request.max_tokens, request.sampling)
        record: dict[str, Any] = {"id": uuid.uuid4().hex, "shadow_of": served.id, "by": other.name}
        try:
            theirs = await self._ask(other, single)
        except BackendDown as down:
            record.update(time=round(time.time(), 3), error=str(down))
        else:
            agree = fold_answer(theirs.texts[0]) == fold_answer(served.answer.texts[0])
            self.metrics.shadow(agree)
            record.update(completion=[{"role": "assistant", "content": theirs.texts[0]}],
                          confidence=theirs.confidence, agree=agree, latency_ms=round(theirs.latency_s * 1000, 3))
            if self.judge is not None:
                student, teacher = served.answer.texts[0], theirs.texts[0]
                if served.answered_by == "teacher":
                    student, teacher = teacher, student
                record["judge"] = await self._judged(served.id, request.messages, student, teacher)
            record["time"] = round(time.time(), 3)
        try:
            self.log.write(record)
        except OSError as exc:  # off the response path: nobody to answer, so say it
            self.warn(f"served log: the shadow comparison of {served.id} was not written: {exc}")

    async def _judged(self, request_id: str, messages: list[dict[str, str]], student: str,
                      teacher: str) -> dict[str, Any]:
        """The judge's verdict on one shadow pair, for its log line; a judge that fails or whose budget is spent
        costs the comparison its verdict, never the request its answer."""
        assert self.judge is not None
        spent_before = self.judge.spent
        try:
            judgement = await self.judge.judge(messages, student, teacher)
        except JudgeSpent as exc:
            self.metrics.judge_skipped()
            if not spent_before:
                self.warn(f"{exc} (${self.judge.cost_usd:.4f} paid); shadow comparisons go on with agreement only")
            return {"skipped": "budget_spent"}
        except JudgeFailed as exc:
            self.metrics.judge_failed()
            self.warn(f"shadow judge: no verdict on the shadow pair of {request_id}: {exc}")
            return {"error": str(exc)}
        self.metrics.judged(judgement.preference, judgement.cost_usd)
        return judgement.record()

    async def drain(self) -> None:
        """Wait for the shadow comparisons in flight (a clean shutdown logs them)."""
        if self.shadow_tasks:
            await asyncio.gather(*list(self.shadow_tasks), return_exceptions=True)
