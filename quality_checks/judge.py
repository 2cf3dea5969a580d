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

The judge writes a short rationale and a last line `Score: N`. A sample scoring below the threshold is
rejected with "judge 4/10 < 7: <the rationale's first line>"; the score is the CheckResult's `score` (also
for passing samples, so `best_of: {by: judge}` can rank them). An answer with no score in it is rejected
with "judge: unparsed verdict"; a judge request that fails after retries puts the sample in failed.jsonl.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from factory.recipe import TeacherConfig

from .base import Check, Verdict
from .registry import CheckOptions, register

if TYPE_CHECKING:
    from factory.asker import Asker
    from factory.records import Sample

JUDGE_SYSTEM = "You are a careful, impartial judge of answers to user requests."  # as eval/judge.py
RUBRIC_PROMPT = (
    "Request:\n{question}\n\n{reference}Answer:\n{answer}\n\nRubric: {rubric}\n\n"
    "Judge the answer against the rubric. Write one or two sentences of rationale, then a last line "
    "`Score: N` with N from 1 (worst) to 10 (best)."
)
_SCORE_LINE = re.compile(r"^[\W_]*score[\W_]*?(10|[1-9])(?:\s*/\s*10)?\b", re.IGNORECASE | re.MULTILINE)
_BARE_SCORE = re.compile(r"^\W*(10|[1-9])(?:\s*/\s*10)?\W*$")
_LABEL = re.compile(r"^[\W_]*(?:rationale|reasoning|explanation)[\W_]*:[\W_]*", re.IGNORECASE)
RATIONALE_CHARS = 200


class JudgeTeacher(TeacherConfig):
    """A factory teacher, with the defaults of a judge: deterministic and short."""

    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 256})

    @model_validator(mode="after")
    def _no_logprobs(self) -> "JudgeTeacher":
        if self.logprobs is not None:
            raise ValueError("logprobs: a judge's logprobs are not kept; remove judge.teacher.logprobs")
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


def parse_judgement(text: str) -> tuple[int, str] | None:
    """(score 1-10, the rationale's first line) from a judge's answer; None when it holds no score.

    The score is the last `Score: N` line (`**Score:** 8/10` too), or an answer that is only a number."""
    matches = _SCORE_LINE.findall(text)
    if matches:
        score = int(matches[-1])
    else:
        bare = _BARE_SCORE.match(text.strip())
        if bare is None:
            return None
        score = int(bare.group(1))
    rationale = ""
    for line in text.splitlines():
        line = line.strip()
        if line and not _SCORE_LINE.match(line) and not _BARE_SCORE.match(line):
            line = _LABEL.sub("", line)
            rationale = line if len(line) <= RATIONALE_CHARS else line[: RATIONALE_CHARS - 1] + "…"
            break
    return score, rationale


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The request as the judge reads it: the user's message, or the whole conversation with roles."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0].get("content") or "")
    return "\n\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content') or ''}" for m in messages)


@register("judge", JudgeOptions)
class Judge(Check):
    awaits = True
    name = "judge"

    def __init__(self, options: JudgeOptions) -> None:
        self.options = options
        self.teacher = options.teacher
        self.threshold = options.threshold
        self.asker: Asker | None = None

    def connect(self, asker: "Asker") -> None:
        self.asker = asker

    def messages(self, sample: "Sample") -> list[dict[str, str]]:
        reference = f"Reference answer:\n{sample.reference}\n\n" if sample.reference is not None else ""
        prompt = RUBRIC_PROMPT.format(question=conversation_text(sample.prompt), reference=reference,
                                      answer=sample.text, rubric=self.options.rubric)
        return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]

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
