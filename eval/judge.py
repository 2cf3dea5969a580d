"""LLM judge: a rubric score per answer, and the student against the reference model pairwise.

The judge is any teacher backend; its requests go through the factory pipeline, so they are cached (an
unchanged answer is never judged, nor paid for, twice), rate-limited and priced. Pairwise comparisons are
asked in both orders; a pair whose two verdicts disagree (position bias) counts as a tie.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.answers import answer_prompts

from .answer import ModelRun
from .config import JudgeConfig
from .golden import GoldenItem

JUDGE_SYSTEM = "You are a careful, impartial judge of answers to user requests."
PAIRWISE = (
    "Request:\n{question}\n\n{reference}Answer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer serves the request better? Reply with exactly one of: A, B, tie."
)
RUBRIC = (
    "Request:\n{question}\n\n{reference}Answer:\n{answer}\n\nRubric: {rubric}\n\n"
    "Score the answer from 1 (worst) to 10 (best) against the rubric. Reply with the number only."
)
_SCORE = re.compile(r"\b(10|[1-9])\b")
_VERDICT = re.compile(r"^\W*(A|B|tie)\b", re.IGNORECASE)


@dataclass
class JudgeResult:
    rubric: dict[str, dict[str, float]] = field(default_factory=dict)  # model → item key → score in [0, 1]
    pairwise: dict[str, float] = field(default_factory=dict)  # item key → 1 student wins, 0.5 tie, 0 loses
    inconsistent: int = 0
    unparsed: int = 0
    cost_usd: float = 0.0


def parse_score(text: str) -> float | None:
    match = _SCORE.search(text)
    return int(match.group(1)) / 10 if match else None


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the judge's first word; None when it said something else."""
    match = _VERDICT.search(text.strip())
    if match is None:
        return None
    word = match.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


def pair_outcome(first: str | None, second: str | None) -> tuple[float, bool]:
    """Student as A in `first`, as B in `second` → (score for the student, consistent?)."""
    win_first = {"A": 1.0, "B": 0.0, "tie": 0.5}.get(first or "", 0.5)
    win_second = {"B": 1.0, "A": 0.0, "tie": 0.5}.get(second or "", 0.5)
    if win_first == win_second:
        return win_first, True
    return 0.5, False


def _reference_block(item: GoldenItem) -> str:
    if item.reference is None:
        return ""
    return f"Reference answer:\n{item.reference}\n\n"


def run_judge(config: JudgeConfig, items: list[GoldenItem], runs: dict[str, ModelRun], student: str,
              reference: str | None, output_dir: Path, console: Any) -> JudgeResult:
    lines: list[dict[str, Any]] = []
    for item in items:
        question = item.prompt_text
        ref = _reference_block(item)
        if config.rubric:
            for name, run in runs.items():
                text = RUBRIC.format(question=question, reference=ref, answer=run.answers[item.key].text,
                                     rubric=config.rubric)
                lines.append({"id": f"rubric|{name}|{item.key}", "prompt": text})
        if config.pairwise and reference and reference != student:
            s, t = runs[student].answers[item.key].text, runs[reference].answers[item.key].text
            lines.append({"id": f"pair|ab|{item.key}", "prompt": PAIRWISE.format(question=question, reference=ref, a=s, b=t)})
            lines.append({"id": f"pair|ba|{item.key}", "prompt": PAIRWISE.format(question=question, reference=ref, a=t, b=s)})
    result = JudgeResult()
    if not lines:
        return result
    teacher = config.model_dump(exclude={"rubric", "pairwise"})
    answers = answer_prompts(teacher, lines, output_dir / "judge", name="run", system=JUDGE_SYSTEM, console=console)
    verdicts = {key: answer.text for key, answer in answers.by_id.items() if answer.error is None}
    result.cost_usd += sum(answer.cost_usd for answer in answers.by_id.values())
    for line in lines:
        kind, part, key = line["id"].split("|", 2)
        text = verdicts.get(line["id"], "")
        if kind == "rubric":
            score = parse_score(text)
            if score is None:
                result.unparsed += 1
            result.rubric.setdefault(part, {})[key] = score or 0.0
    asked = {line["id"] for line in lines}
    for item in items:
        ab, ba = f"pair|ab|{item.key}", f"pair|ba|{item.key}"
        if ab not in asked:
            continue
        first, second = parse_verdict(verdicts.get(ab, "")), parse_verdict(verdicts.get(ba, ""))
        result.unparsed += (first is None) + (second is None)
        score, consistent = pair_outcome(first, second)
        result.inconsistent += not consistent
        result.pairwise[item.key] = score
    return result
