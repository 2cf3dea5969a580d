"""The one LLM judge: the prompts, the answer's shape and the parsers of the factory's `judge` check and of
eval's judge (its rubric metric and its pairwise comparison).

Two questions, one family of prompts, one system prompt:

- rubric: score one answer against a rubric, 1 (worst) to 10 (best), with a short rationale;
- pairwise: which of two answers, A or B, serves the request better, or a tie.

Where the judge's provider constrains answers to a schema (`teacher.structured_output`: OpenAI's strict
json_schema `response_format`, Anthropic's forced tool) the judge asks for `{"rationale", "score"}` or
`{"rationale", "winner"}`; the schema is part of the request body, so the cache keys on it. A local or
vLLM judge is asked for a last line `Score: N` or `Winner: A|B|tie` instead (for a rubric, the prompt the
factory's judge always sent), and a strict parser reads the text: it takes an explicit verdict only, and
calls anything else unparsed (None) rather than guess. It never reads the "10" of "out of 10" or the "1" of
"1 to 10" as a score.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Callable

from factory.recipe import STRUCTURED_OUTPUT_PROVIDERS, StructuredOutput

if TYPE_CHECKING:
    from factory.recipe import TeacherConfig

JUDGE_SYSTEM = "You are a careful, impartial judge of answers to user requests."
RUBRIC_PROMPT = "Request:\n{question}\n\n{reference}Answer:\n{answer}\n\nRubric: {rubric}\n\n{instruction}"
PAIRWISE_PROMPT = "Request:\n{question}\n\n{reference}Answer A:\n{a}\n\nAnswer B:\n{b}\n\n{instruction}"
# (text, structured): the text form says how to write the verdict; a structured answer has its fields.
RUBRIC_INSTRUCTION = (
    "Judge the answer against the rubric. Write one or two sentences of rationale, then a last line "
    "`Score: N` with N from 1 (worst) to 10 (best).",
    "Judge the answer against the rubric: one or two sentences of rationale, and a score from 1 (worst) "
    "to 10 (best).",
)
PAIRWISE_INSTRUCTION = (
    "Which answer serves the request better? Write one or two sentences of rationale, then a last line "
    "`Winner: A`, `Winner: B` or `Winner: tie`.",
    "Which answer serves the request better? One or two sentences of rationale, and the winner: A, B or tie.",
)
# The rationale comes first in both schemas: a model that writes in schema order reasons before it decides.
RUBRIC_OUTPUT = StructuredOutput(
    name="rubric_verdict", description="Record the judgement of the answer against the rubric.",
    json_schema={
        "type": "object",
        "properties": {
            "rationale": {"type": "string", "description": "one or two sentences"},
            # An enum, not minimum/maximum: every provider's schema subset has enums.
            "score": {"type": "integer", "enum": list(range(1, 11)), "description": "1 (worst) to 10 (best)"},
        },
        "required": ["rationale", "score"],
        "additionalProperties": False,
    },
)
PAIRWISE_OUTPUT = StructuredOutput(
    name="pairwise_verdict", description="Record which answer serves the request better.",
    json_schema={
        "type": "object",
        "properties": {
            "rationale": {"type": "string", "description": "one or two sentences"},
            "winner": {"type": "string", "enum": ["A", "B", "tie"]},
        },
        "required": ["rationale", "winner"],
        "additionalProperties": False,
    },
)
RATIONALE_CHARS = 200


def judge_teacher(config: "TeacherConfig", output: StructuredOutput) -> "TeacherConfig":
    """The judge's model asking for `output` where its provider has structured output; as it is elsewhere."""
    if config.provider not in STRUCTURED_OUTPUT_PROVIDERS:
        return config
    return config.model_copy(update={"structured_output": output})


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The request as the judge reads it: the user's message, or the whole conversation with roles."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0].get("content") or "")
    return "\n\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content') or ''}" for m in messages)


def _reference_block(reference: str | None) -> str:
    return "" if reference is None else f"Reference answer:\n{reference}\n\n"


def rubric_prompt(question: str, answer: str, rubric: str, reference: str | None, *, structured: bool) -> str:
    return RUBRIC_PROMPT.format(question=question, reference=_reference_block(reference), answer=answer,
                                rubric=rubric, instruction=RUBRIC_INSTRUCTION[structured])


def pairwise_prompt(question: str, a: str, b: str, reference: str | None, *, structured: bool) -> str:
    return PAIRWISE_PROMPT.format(question=question, reference=_reference_block(reference), a=a, b=b,
                                  instruction=PAIRWISE_INSTRUCTION[structured])


def judge_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


def pair_outcome(first: str | None, second: str | None) -> tuple[float, bool]:
    """Student as A in `first`, as B in `second` → (score for the student, consistent?). A pair whose two
    verdicts disagree (position bias), or one with no clear verdict, counts as a tie."""
    win_first = {"A": 1.0, "B": 0.0, "tie": 0.5}.get(first or "", 0.5)
    win_second = {"B": 1.0, "A": 0.0, "tie": 0.5}.get(second or "", 0.5)
    if win_first == win_second:
        return win_first, True
    return 0.5, False


# ---- reading a verdict ---------------------------------------------------------------------------------
# A number that is the whole number: not the 7 of 7.5, not the 1 of 11, optionally "/10" or "out of 10".
_NUMBER = r"(?P<n>\d+)(?:\s*/\s*10|\s+out\s+of\s+10)?(?!\d)(?![.,]\d)"
# A line that states a score: it starts with the label and holds a number. Only the strict form below is read;
# any other such line ("Score: 7.5", "Score: 7 or 8") is a verdict that cannot be read, never skipped.
_SCORE_LABEL = re.compile(r"(?:(?:final|overall|total)\s+)?(?:score|rating|grade)\b(?=.*\d)", re.IGNORECASE)
# "Score: 7", "Final score = 7/10", "Score out of 10: 7", "Rating (1-10): 7", "Score on a scale of 1 to 10: 7";
# after the number, words and punctuation but no other number.
_SCORE_LINE = re.compile(
    r"(?:(?:final|overall|total)\s+)?(?:score|rating|grade)"
    r"(?:\s*\(?\s*(?:out\s+of\s+10|/\s*10|(?:on\s+a\s+scale\s+)?(?:of\s+|from\s+)?1\s*(?:-|–|to)\s*10)\s*\)?)?"
    r"(?:\s*[:=]\s*|\s+is\s+)" + _NUMBER + r"(?:\W\D*)?",
    re.IGNORECASE,
)
_BARE_SCORE = re.compile(_NUMBER + r"[.!]?")
_BARE_NUMBER = re.compile(r"[\d.,]+(?:\s*/\s*[\d.,]+|\s+out\s+of\s+[\d.,]+)?[.!]?", re.IGNORECASE)  # 7.5, 11, 8/100
# "… so I give it 8/10." as the last line: its one N/10 (or N out of 10), and the line ends there.
_ANY_FRACTION = re.compile(r"\d+(?:[.,]\d+)?\s*(?:/\s*\d+|out\s+of\s+\d+)", re.IGNORECASE)
_FRACTION = re.compile(r"(?<![\d.,])(\d+)\s*(?:/\s*10|out\s+of\s+10)(?!\d)", re.IGNORECASE)
_FRACTION_END = re.compile(r"[\s.!)]*")
_WINNER_LABEL = re.compile(
    r"(?:final\s+)?(?:winner|verdict|better(?:\s+answer)?|preferred(?:\s+answer)?)\s*[:=]", re.IGNORECASE)
_WINNER_LINE = re.compile(_WINNER_LABEL.pattern + r"\s*(?:answer\s+)?(?P<v>a|b|tie)\W*", re.IGNORECASE)
_BARE_WINNER = re.compile(r"(?:answer\s+)?(?P<v>a|b|tie)[.!]?", re.IGNORECASE)
_MARKUP = re.compile(r"[*`]")  # emphasis and code marks around a verdict: **Score:** 8
_LEAD = re.compile(r"^(?:[>#]+\s*|[-•]\s+)+")  # quote, heading and bullet marks
_LABEL = re.compile(r"^[\W_]*(?:rationale|reasoning|explanation)[\W_]*:[\W_]*", re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
UNCLEAR = ""  # a verdict line that cannot be read: unparsed, and no earlier line is read in its place


def parse_judgement(text: str) -> tuple[int, str] | None:
    """(score 1-10, the rationale's first line) from a rubric verdict; None when it holds no clear score.

    A JSON object (a structured answer) gives its integer `score` and its `rationale`. In text, the score
    is the last line `Score: N` (also `**Score:** 8/10`, `Score out of 10: 7`, `Rating (1-10): 7`), or a last
    line that is only the score (`7`, `7/10`, `7 out of 10`) or ends with the one `N/10` or `N out of 10` it
    holds. The last line that states a score decides: out of 1-10, a decimal, two scores on it: None."""
    data = _json_object(text)
    if data is not None:
        score = data.get("score")
        if type(score) is not int or not 1 <= score <= 10:
            return None
        return score, _first_line(str(data.get("rationale") or ""))
    rows = [(raw.strip(), plain) for raw, plain in ((raw, _plain(raw)) for raw in text.splitlines()) if plain]
    found = _last_verdict([plain for _, plain in rows], _SCORE_LABEL, _SCORE_LINE, "n", _last_line_score)
    if not found or not 1 <= int(found) <= 10:
        return None
    rationale = next((_first_line(_LABEL.sub("", raw)) for raw, plain in rows
                      if not _SCORE_LABEL.match(plain) and not _BARE_NUMBER.fullmatch(plain)), "")
    return int(found), rationale


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a pairwise verdict; None when it holds no clear winner.

    A JSON object gives its `winner`. In text: the last line `Winner: A` (`Verdict: B`, `Better answer:
    tie`), or a last line that is only the verdict (`A`, `b.`, `Answer B`, `Tie`)."""
    data = _json_object(text)
    if data is not None:
        return _winner(str(data.get("winner") or ""))
    lines = [line for line in map(_plain, text.splitlines()) if line]
    found = _last_verdict(lines, _WINNER_LABEL, _WINNER_LINE, "v",
                          lambda line: _group(_BARE_WINNER.fullmatch(line), "v"))
    return _winner(found) if found else None


def _last_verdict(lines: list[str], label: re.Pattern[str], labelled: re.Pattern[str], group: str,
                  last_line: Callable[[str], str | None]) -> str | None:
    """The value of the last line that states a verdict: the last line when it is a verdict of its own,
    else the last labelled line. UNCLEAR when that line is not in the strict form; None when there is none."""
    if lines and not label.match(lines[-1]):
        value = last_line(lines[-1])
        if value is not None:
            return value
    for line in reversed(lines):
        if label.match(line):
            match = labelled.fullmatch(line)
            return match.group(group) if match is not None else UNCLEAR
    return None


def _last_line_score(line: str) -> str | None:
    """The score a last line states on its own; UNCLEAR for a number or fraction that is no clear score."""
    bare = _BARE_SCORE.fullmatch(line)
    if bare is not None:
        return bare.group("n")
    if _BARE_NUMBER.fullmatch(line):
        return UNCLEAR
    if not _ANY_FRACTION.search(line):
        return None
    fractions = list(_FRACTION.finditer(line))
    if len(_ANY_FRACTION.findall(line)) != 1 or len(fractions) != 1:
        return UNCLEAR  # two scores, or one out of another scale
    return fractions[0].group(1) if _FRACTION_END.fullmatch(line, fractions[0].end()) else UNCLEAR


def _group(match: re.Match[str] | None, name: str) -> str | None:
    return match.group(name) if match is not None else None


def _winner(word: str) -> str | None:
    word = word.strip()
    if word.lower() == "tie":
        return "tie"
    return word.upper() if word.upper() in ("A", "B") else None


def _json_object(text: str) -> dict[str, Any] | None:
    """The answer as a JSON object when it is one (a structured answer, or a text judge writing JSON); an
    answer that starts as JSON and does not parse (cut short) is an empty object: no verdict."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced is not None:
        text = fenced.group(1)
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _plain(line: str) -> str:
    return _LEAD.sub("", _MARKUP.sub("", line)).strip()


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= RATIONALE_CHARS else line[: RATIONALE_CHARS - 1] + "…"
