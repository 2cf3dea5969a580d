"""`judge`: an LLM scores each answer from 1 to 10 against a rubric; answers below `threshold` are rejected.

    checks:
      - empty
      - refusal
      - exact_dup
      - {name: judge, teacher: {provider: openai, model: gpt-4o-mini}, rubric: "correct and concise", threshold: 7}

The judge is any factory teacher (openai, anthropic, local; `params` default to temperature 0). Its
requests go through the run: its own limiter (shared with the teacher when both are the same model at the
same endpoint), retries, the run's `cache.sqlite` (a judgement paid for is never paid again on resume)
and `budget_usd`; its tokens and cost are counted apart from the teacher's (`manifest.json`: `this_run.judge`,
`totals.judge`). Put it after the cheap checks: a sample reaches it only when every check before it passed.

The judge is the one eval uses too (quality_checks/judging.py): an OpenAI or Anthropic judge answers with
structured output (`{"rationale", "score"}`), a local or vLLM one with a short rationale and a last line
`Score: N`, read by a strict parser. A sample scoring below the threshold is rejected with "judge 4/10 < 7:
<the rationale's first line>"; the score is the CheckResult's `score` (also for passing samples, so
`best_of: {by: judge}` can rank them). An answer with no clear score is rejected with "judge: unparsed
verdict"; a judge request that fails after retries puts the sample in failed.jsonl.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from factory.recipe import TeacherConfig

from .base import Check, Verdict
from .judging import RUBRIC_OUTPUT, conversation_text, judge_messages, judge_teacher, parse_judgement, rubric_prompt
from .registry import CheckOptions, register

if TYPE_CHECKING:
    from factory.asker import Asker
    from factory.records import Sample


class JudgeTeacher(TeacherConfig):
    """A factory teacher, with the defaults of a judge: deterministic and short."""

    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 256})

    @model_validator(mode="after")
    def _what_a_judge_takes(self) -> "JudgeTeacher":
        if self.logprobs is not None:
            raise ValueError("logprobs: a judge's logprobs are not kept; remove judge.teacher.logprobs")
        if self.structured_output is not None:
            raise ValueError("structured_output: the judge asks for its own verdict format; remove it")
        return self


class JudgeOptions(CheckOptions):
    teacher: JudgeTeacher = Field(description="the judge model: any factory teacher (provider, model, base_url, params, ...)")
    rubric: str = Field(min_length=1, description="what a good answer is; the judge scores against it")
    threshold: float = Field(default=7, ge=1, le=10, description="samples scoring below it (1-10) are rejected")

    def fingerprint_data(self) -> dict[str, Any]:
        """What decides a judgement: the judge (as a teacher's fingerprint), the rubric, the threshold;
        not its concurrency, limits, retries or price, which may change between runs like the teacher's."""
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"teacher"})
        teacher = self.teacher
        data["teacher"] = {"provider": teacher.provider, "model": teacher.model, "base_url": teacher.base_url,
                           "params": teacher.params, **({"context": teacher.context} if teacher.context else {})}
        data["rubric"] = self.rubric
        return data


@register("judge", JudgeOptions)
class Judge(Check):
    awaits = True
    name = "judge"

    def __init__(self, options: JudgeOptions) -> None:
        self.options = options
        # The config the run builds the judge's model from: with the verdict's schema where the provider has
        # structured output. Not in the fingerprint (JudgeOptions.fingerprint_data): the code decides it.
        self.teacher = judge_teacher(options.teacher, RUBRIC_OUTPUT)
        self.structured = self.teacher.structured_output is not None
        self.threshold = options.threshold
        self.asker: Asker | None = None

    def connect(self, asker: "Asker") -> None:
        self.asker = asker

    def messages(self, sample: "Sample") -> list[dict[str, str]]:
        return judge_messages(rubric_prompt(conversation_text(sample.prompt), sample.text, self.options.rubric,
                                            sample.reference, structured=self.structured))

    async def averdict(self, sample: "Sample") -> Verdict:
        if self.asker is None:
            raise RuntimeError("the judge is not connected to a model; the factory pipeline connects it")
        messages = self.messages(sample)
        body = self.asker.build(messages)
        response, _ = await self.asker.ask(body, chars=sum(len(m["content"]) for m in messages))
        text = response.choices[0].text if response.choices else ""
        parsed = parse_judgement(text)
        if parsed is None:
            return Verdict(False, "judge: unparsed verdict")
        score, rationale = parsed
        if score < self.threshold:
            return Verdict(False, f"judge {score}/10 < {self.threshold:g}: {rationale}".rstrip(": "), score)
        return Verdict(True, None, score)
