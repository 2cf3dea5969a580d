"""`serve.shadow_judge`: the LLM judge of shadow pairs, off the response path, within its own budget.

The judge is the eval's pairwise judge (quality_checks/judging.py: its prompt, its verdict schema where the
provider has structured output, its strict parser), asked in both orders like the eval asks it: a pair whose
two verdicts disagree (position bias) is a tie. Its requests go through a serve backend (serve/backends.py:
the factory's limiter, retries and pricing, no cache), and stop for good once `budget_usd` could be overshot.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from apprentice.errors import ApprenticeError, TeacherError
from factory.asker import BudgetExhausted
from factory.recipe import TeacherConfig
from quality_checks.judging import (
    PAIRWISE_OUTPUT,
    conversation_text,
    judge_messages,
    judge_teacher,
    pair_outcome,
    pairwise_prompt,
    parse_verdict,
)

from .backends import Backend
from .config import ShadowJudgeConfig

PREFERRED = {1.0: "student", 0.5: "tie", 0.0: "teacher"}


class JudgeSpent(ApprenticeError):
    """The judge's budget_usd is spent: no more verdicts are asked."""


class JudgeFailed(ApprenticeError):
    """A verdict could not be had (the judge's errors after its retries, its circuit open)."""


@dataclass(slots=True)
class Judgement:
    verdicts: list[str | None]  # with the student's answer as A, then as B
    preference: float | None    # for the student: 1 preferred, 0.5 a tie, 0 the teacher's preferred; None unread
    consistent: bool
    cost_usd: float

    def record(self) -> dict[str, object]:
        """What the shadow comparison's line holds of it."""
        preferred = PREFERRED.get(self.preference) if self.preference is not None else None
        return {"preferred": preferred, "preference": self.preference, "verdicts": self.verdicts,
                "consistent": self.consistent, "cost_usd": round(self.cost_usd, 8)}


class ShadowJudge:
    def __init__(self, config: ShadowJudgeConfig) -> None:
        plain = TeacherConfig.model_validate(config.model_dump(exclude={"budget_usd"}))
        self.budget_usd = config.budget_usd
        self.backend = Backend("shadow_judge", judge_teacher(plain, PAIRWISE_OUTPUT), config.budget_usd)
        self.structured = self.backend.config.structured_output is not None
        self.spent = False

    @property
    def cost_usd(self) -> float:
        return self.backend.usage.cost_usd

    async def judge(self, messages: list[dict[str, str]], student: str, teacher: str) -> Judgement:
        """Which answer serves the request better, asked in both orders; raises JudgeSpent or JudgeFailed."""
        if self.spent:
            raise JudgeSpent(f"the shadow judge's budget of ${self.budget_usd:g} is spent")
        if self.backend.down:
            raise JudgeFailed("shadow_judge: circuit open after repeated failures")
        question = conversation_text(messages)
        asked = await asyncio.gather(self._verdict(question, student, teacher),
                                     self._verdict(question, teacher, student), return_exceptions=True)
        for outcome in asked:
            if isinstance(outcome, BudgetExhausted):
                self.spent = True
                raise JudgeSpent(f"the shadow judge's budget of ${self.budget_usd:g} is spent")
        for outcome in asked:
            if isinstance(outcome, TeacherError):
                raise JudgeFailed(f"shadow_judge: {outcome}")
            if isinstance(outcome, ApprenticeError):  # the limiter closing at shutdown
                raise JudgeFailed(f"shadow_judge: {type(outcome).__name__} {outcome}".rstrip())
            if isinstance(outcome, BaseException):
                raise outcome
        (first, first_cost), (second, second_cost) = asked  # type: ignore[misc]
        verdicts = [parse_verdict(first), parse_verdict(second)]
        preference, consistent = pair_outcome(*verdicts)
        unread = None in verdicts
        return Judgement(verdicts, None if unread else preference, consistent, first_cost + second_cost)

    async def _verdict(self, question: str, a: str, b: str) -> tuple[str, float]:
        messages = judge_messages(pairwise_prompt(question, a, b, None, structured=self.structured))
        body = self.backend.body(messages, 1, None, {})
        response, cost = await self.backend.asker.ask(body, chars=sum(len(m["content"]) for m in messages))
        return (response.choices[0].text if response.choices else ""), cost

    async def aclose(self) -> None:
        await self.backend.aclose()
