"""LLM judge: a rubric score per answer, and the student against the reference model pairwise.

The judge is the factory's (quality_checks/judging.py: one prompt family, structured output where the
provider has it, one strict parser) on any teacher backend; its requests go through the factory pipeline,
so they are cached (an unchanged answer is never judged, nor paid for, twice), rate-limited and priced.
Rubric and pairwise questions are two runs (`judge/rubric-…`, `judge/pairwise-…`), as each asks for its
own verdict schema. Pairwise comparisons are asked in both orders; a pair whose two verdicts disagree
(position bias) counts as a tie. A verdict the parser cannot read is counted in `unparsed`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.answers import answer_prompts
from quality_checks.judging import (
    JUDGE_SYSTEM,
    PAIRWISE_OUTPUT,
    RUBRIC_OUTPUT,
    judge_teacher,
    pair_outcome,
    pairwise_prompt,
    parse_judgement,
    parse_verdict,
    rubric_prompt,
)

from .answer import ModelRun
from .config import JudgeConfig
from .golden import GoldenItem


@dataclass
class JudgeResult:
    rubric: dict[str, dict[str, float]] = field(default_factory=dict)  # model → item key → score in [0, 1]
    pairwise: dict[str, float] = field(default_factory=dict)  # item key → 1 student wins, 0.5 tie, 0 loses
    inconsistent: int = 0
    unparsed: int = 0
    cost_usd: float = 0.0
    spent: dict[str, dict[str, float]] = field(default_factory=dict)  # rubric / pairwise → what this eval paid


def parse_score(text: str) -> float | None:
    """The rubric score in [0, 1] (score / 10); None when the verdict holds no clear score."""
    parsed = parse_judgement(text)
    return parsed[0] / 10 if parsed is not None else None


def run_judge(config: JudgeConfig, items: list[GoldenItem], runs: dict[str, ModelRun], student: str,
              reference: str | None, output_dir: Path, console: Any) -> JudgeResult:
    rubric_judge = judge_teacher(config, RUBRIC_OUTPUT)
    pairwise_judge = judge_teacher(config, PAIRWISE_OUTPUT)
    rubric_lines: list[dict[str, Any]] = []
    pair_lines: list[dict[str, Any]] = []
    for item in items:
        question = item.prompt_text
        if config.rubric:
            structured = rubric_judge.structured_output is not None
            for name, run in runs.items():
                text = rubric_prompt(question, run.answers[item.key].text, config.rubric, item.reference,
                                     structured=structured)
                rubric_lines.append({"id": f"rubric|{name}|{item.key}", "prompt": text})
        if config.pairwise and reference and reference != student:
            structured = pairwise_judge.structured_output is not None
            s, t = runs[student].answers[item.key].text, runs[reference].answers[item.key].text
            for order, (a, b) in (("ab", (s, t)), ("ba", (t, s))):
                pair_lines.append({"id": f"pair|{order}|{item.key}",
                                   "prompt": pairwise_prompt(question, a, b, item.reference, structured=structured)})
    result = JudgeResult()
    verdicts: dict[str, str] = {}
    for name, judge, lines in (("rubric", rubric_judge, rubric_lines), ("pairwise", pairwise_judge, pair_lines)):
        if not lines:
            continue
        teacher = judge.model_dump(exclude={"rubric", "pairwise"})
        answers = answer_prompts(teacher, lines, output_dir / "judge", name=name, system=JUDGE_SYSTEM, console=console)
        verdicts.update({key: answer.text for key, answer in answers.by_id.items() if answer.error is None})
        result.cost_usd += sum(answer.cost_usd for answer in answers.by_id.values())
        result.spent[f"{name} verdicts"] = answers.spent
    for line in rubric_lines:
        _, model, key = line["id"].split("|", 2)
        score = parse_score(verdicts.get(line["id"], ""))
        if score is None:
            result.unparsed += 1
        result.rubric.setdefault(model, {})[key] = score or 0.0
    asked = {line["id"] for line in pair_lines}
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
