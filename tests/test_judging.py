"""The one judge (quality_checks/judging.py) of the factory's `judge` check and of eval: the strict verdict
parsers, the request each provider gets (structured output where it has it, the text prompt elsewhere), and
eval's rubric and pairwise judge through the real anthropic SDK (a forced tool) against the fake server."""
from __future__ import annotations

import pytest
from rich.console import Console

from eval.answer import Answer, ModelRun
from eval.config import JudgeConfig, ModelConfig
from eval.golden import GoldenItem
from eval.judge import parse_score, run_judge
from eval.run import spend
from factory.records import Sample
from factory.teachers import make_teacher
from quality_checks.judge import Judge, JudgeOptions
from quality_checks.judging import PAIRWISE_OUTPUT, RUBRIC_OUTPUT, parse_judgement, parse_verdict

# (answer, (score, rationale) or None). None is "judge: unparsed verdict": never a guessed score.
RUBRIC_VERDICTS = [
    # eval's old parser read these as 10/10 and 1/10
    ("Score out of 10: 7", (7, "")),
    ("On a scale of 1 to 10, I give 8", None),  # no explicit score form: unparsed, not 1
    ("On a scale of 1 to 10, I give it 8/10.", (8, "On a scale of 1 to 10, I give it 8/10.")),
    ("Clear and correct.\nScore: 9", (9, "Clear and correct.")),
    ("Minor slip.\n**Score:** 8/10", (8, "Minor slip.")),
    ("Rating (1-10): 6", (6, "")),
    ("Mostly right.\nFinal score = 7 out of 10.", (7, "Mostly right.")),
    ("Solid.\n8 out of 10", (8, "Solid.")),
    ("10", (10, "")),
    # structured answers, and text judges writing JSON
    ('{"rationale": "Accurate.\\nShort.", "score": 9}', (9, "Accurate.")),
    ('```json\n{"rationale": "Off topic.", "score": 2}\n```', (2, "Off topic.")),
    ('{"rationale": "Good.", "score": 7.5}', None),
    ('{"rationale": "Good.", "score": "8"}', None),
    ('{"rationale": "Good.", "score": 11}', None),
    ('{"rationale": "It goes on and on', None),  # cut at max_tokens
    # refusals, ambiguity, out of range
    ("I'm sorry, but I can't evaluate this answer.", None),
    ("Score: 7 or 8", None),
    ("It earns 3/10 for style and 9/10 for content.", None),
    ("Score: 6\nOn reflection:\nScore: 7.5", None),  # the last score is unreadable: the earlier one is not used
    ("Score: 0", None),
    ("Score: 11", None),
    ("Score: 7.5", None),
    ("7.5/10", None),
    ("I would give it 15 out of 20.", None),
    ("Score: 8/100", None),
    ("Good.\nScore: 8\nThough it gets 3/4 facts right.", None),
]


@pytest.mark.parametrize("text, expected", RUBRIC_VERDICTS)
def test_rubric_verdicts_are_read_strictly(text, expected):
    assert parse_judgement(text) == expected


@pytest.mark.parametrize("text, expected", [
    ('{"rationale": "B is complete.", "winner": "B"}', "B"),
    ('{"rationale": "Same.", "winner": "tie"}', "tie"),
    ('{"rationale": "?", "winner": "both"}', None),
    ("B covers the edge case.\nWinner: B", "B"),
    ("**Winner:** tie", "tie"),
    ("Answer A", "A"),
    ("Winner: A or B", None),
    ("A is better, but B is shorter.", None),
    ("I cannot compare these.", None),
])
def test_pairwise_verdicts_are_read_strictly(text, expected):
    assert parse_verdict(text) == expected


def test_eval_reads_the_rubric_with_the_same_parser():
    assert parse_score("Score out of 10: 7") == 0.7, "not the 10 of 'out of 10'"
    assert parse_score("On a scale of 1 to 10, I give 8") is None, "not the 1 of '1 to 10': unparsed"


def _judge(provider: str, base_url: str | None = None) -> Judge:
    teacher = {"provider": provider, "model": "judge-model", "base_url": base_url, "api_key_env": "NO_SUCH_KEY"}
    return Judge(JudgeOptions.model_validate({"name": "judge", "rubric": "correct", "teacher": teacher}))


def _sample() -> Sample:
    return Sample(id="s", prompt=[{"role": "user", "content": "Capital of France?"}],
                  completion=[{"role": "assistant", "content": "Paris."}], teacher={})


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_hosted_judge_asks_for_structured_output_in_the_body_the_cache_keys_on(provider):
    judge = _judge(provider, "http://127.0.0.1:9/v1")
    body = make_teacher(judge.teacher).build_request(judge.messages(_sample()), 1)
    schema = RUBRIC_OUTPUT.json_schema
    if provider == "openai":
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "rubric_verdict", "strict": True, "schema": schema,
            "description": "Record the judgement of the answer against the rubric."}}
    else:
        assert body["tools"][0]["input_schema"] == schema and body["tools"][0]["name"] == "rubric_verdict"
        assert body["tool_choice"] == {"type": "tool", "name": "rubric_verdict"}
    prompt = judge.messages(_sample())[-1]["content"]
    assert "Score: N" not in prompt and prompt.endswith("a score from 1 (worst) to 10 (best).")
    assert "structured_output" not in str(judge.options.fingerprint_data()), "the run's fingerprint is unchanged"


def test_a_local_judge_gets_the_text_prompt_it_always_had():
    judge = _judge("local")
    assert judge.teacher.structured_output is None
    assert judge.messages(_sample()) == [
        {"role": "system", "content": "You are a careful, impartial judge of answers to user requests."},
        {"role": "user", "content": "Request:\nCapital of France?\n\nAnswer:\nParis.\n\nRubric: correct\n\n"
                                    "Judge the answer against the rubric. Write one or two sentences of rationale, "
                                    "then a last line `Score: N` with N from 1 (worst) to 10 (best)."}]


def test_a_judge_takes_no_structured_output_of_its_own():
    structured = {"name": "x", "json_schema": {"type": "object"}}
    with pytest.raises(ValueError, match="the judge asks for its own verdict format"):
        JudgeOptions.model_validate({"name": "judge", "rubric": "r",
                                     "teacher": {"provider": "openai", "structured_output": structured}})
    with pytest.raises(ValueError, match="the judge asks for its own verdict format"):
        JudgeConfig.model_validate({"provider": "openai", "structured_output": structured})


def test_eval_judge_through_a_forced_anthropic_tool_counts_what_it_cannot_read(tmp_path, server, env_key):
    """Rubric and pairwise verdicts come back as tool calls; a verdict cut at max_tokens is unparsed."""
    def responder(messages: list, index: int, body: dict) -> dict:
        tool = body["tool_choice"]["name"]
        assert tool in (RUBRIC_OUTPUT.name, PAIRWISE_OUTPUT.name) and body["system"].startswith("You are a careful")
        prompt = messages[-1]["content"]
        if tool == PAIRWISE_OUTPUT.name:  # the student's answer is A in one order and B in the other
            student_first = prompt.index("student") < prompt.index("teacher")
            return {"rationale": "The student is right.", "winner": "A" if student_first else "B"}
        if "rambles" in prompt:
            return {"rationale": "long " * 200, "score": 3}  # cut short: no score
        return {"rationale": "Fine.", "score": 8 if "teacher" in prompt else 6}

    server.config.responder = responder
    items = [GoldenItem(id=f"q{i}", set="g", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(2)]
    texts = {"teacher": ["teacher says 0", "teacher says 1"], "student": ["student says 0", "student rambles 1"]}
    runs = {name: ModelRun(ModelConfig(name=name),
                           {item.key: Answer(text) for item, text in zip(items, answers, strict=True)})
            for name, answers in texts.items()}
    config = JudgeConfig(provider="anthropic", model="claude-haiku-4-5", base_url=server.anthropic_base_url,
                         api_key_env="APPRENTICE_TEST_KEY", rubric="correct", max_retries=0,
                         params={"temperature": 0, "max_tokens": 64})
    result = run_judge(config, items, runs, "student", "teacher", tmp_path, Console(quiet=True))
    assert result.rubric == {"teacher": {"g/q0": 0.8, "g/q1": 0.8}, "student": {"g/q0": 0.6, "g/q1": 0.0}}
    assert result.unparsed == 1, "the cut verdict is counted, not read as a score"
    assert result.pairwise == {"g/q0": 1.0, "g/q1": 1.0} and result.inconsistent == 0
    assert sorted(path.name.split("-")[0] for path in (tmp_path / "judge").iterdir() if path.is_dir()) == [
        "pairwise", "rubric"]
    # What the judge's verdicts cost this eval, by kind: 4 rubric and 4 pairwise requests, priced (a known model).
    assert {kind: spent["requests"] for kind, spent in result.spent.items()} == {
        "rubric verdicts": 4, "pairwise verdicts": 4}
    assert all(spent["cost_usd"] > 0 and spent["output_tokens"] > 0 for spent in result.spent.values()), result.spent
    summary = spend(runs, result)
    assert [(part["model"], part["part"]) for part in summary["parts"]] == [
        ("judge", "rubric verdicts"), ("judge", "pairwise verdicts")], "local answers cost nothing and are not listed"
    assert summary["total"]["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in result.spent.values()), abs=1e-6)
    again = run_judge(config, items, runs, "student", "teacher", tmp_path, Console(quiet=True))
    assert spend(runs, again)["total"] == {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0}, \
        "verdicts from the cache are not paid again"
