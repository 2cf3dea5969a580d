"""The LLM-judge check and best-of-n, through the real openai/anthropic SDKs against the fake server: the
server's responder plays both the teacher and the judge (it tells them apart by the judge's system prompt)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_jsonl, write_recipe
from factory.__main__ import main
from factory.recipe import RecipeError, load_factory_config
from quality_checks.judge import JUDGE_SYSTEM, parse_judgement


def is_judge(messages: list) -> bool:
    return messages[0].get("role") == "system" and messages[0]["content"] == JUDGE_SYSTEM


def judged_answer(messages: list) -> str:
    """The answer text inside a judge prompt."""
    prompt = messages[-1]["content"]
    return prompt.split("Answer:\n", 1)[1].split("\n\nRubric:", 1)[0]


def split(server) -> tuple[list[dict], list[dict]]:
    """(teacher bodies, judge bodies) the server saw."""
    bodies = list(server.stats.bodies)
    judge = [b for b in bodies if is_judge(b["messages"]) or b.get("system") == JUDGE_SYSTEM]
    return [b for b in bodies if b not in judge], judge


def stats(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["stats", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def prompts_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


JUDGE = ("    - {{name: judge, rubric: 'correct and polite', threshold: 7, "
         "teacher: {{provider: {provider}, model: {model}, base_url: {url}, api_key_env: APPRENTICE_TEST_KEY, "
         "max_retries: 1, price: {{input: 1, output: 2}}}}}}\n")


def judge_item(server, provider: str = "openai", model: str = "judge-mini") -> str:
    url = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    return JUDGE.format(provider=provider, model=model, url=url)


# ---- parsing and options ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The answer is right and complete.\nScore: 9", (9, "The answer is right and complete.")),
    ("Rationale: it lists 3 wrong dates.\n\nScore: 2/10", (2, "it lists 3 wrong dates.")),
    ("**Score:** 10\nFlawless.", (10, "Flawless.")),
    ("Score: 4\nGood start.\nScore: 6", (6, "Good start.")),
    ("7", (7, "")),
    ("I would give it 15 out of 20.", None),
    ("Score: 0", None),
    ("", None),
])
def test_parse_judgement(text, expected):
    assert parse_judgement(text) == expected


def test_judge_options_are_checked_with_key_paths_and_fingerprinted_by_what_decides(tmp_path):
    base = "factory:\n  prompts: {path: p.jsonl}\n  checks:\n"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(base + "    - empty\n    - judge\n"
                      "    - {name: judge, label: j2, rubric: '', threshold: 11, teacher: {provider: openai, colour: red}}\n"
                      "    - {name: judge, label: j3, rubric: r, teacher: {logprobs: {top_k: 2}}}\n")
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    for expected in ("factory.checks.1: Value error, check 'judge' needs options (rubric, teacher)",
                     "factory.checks.2.rubric:", "factory.checks.2.threshold:", "factory.checks.2.teacher.colour: unknown key",
                     "factory.checks.3.teacher: Value error, logprobs: a judge's logprobs are not kept"):
        assert expected in text, text

    def fingerprint(judge: str) -> dict:
        path = tmp_path / "ok.yaml"
        path.write_text(base + f"    - {{name: judge, rubric: be right, {judge}}}\n")
        return load_factory_config(path).fingerprint()

    plain = fingerprint("teacher: {provider: openai, model: gpt-4o-mini}")
    assert plain["checks"] == [{"name": "judge", "rubric": "be right", "teacher": {
        "provider": "openai", "model": "gpt-4o-mini", "base_url": None, "params": {"temperature": 0.0, "max_tokens": 256}}}]
    # how fast the judge is asked may change between runs; what it is asked may not
    assert fingerprint("teacher: {provider: openai, model: gpt-4o-mini, max_concurrency: 3, rpm: 60}") == plain
    assert fingerprint("threshold: 8, teacher: {provider: openai, model: gpt-4o-mini}") != plain
    assert fingerprint("teacher: {provider: openai, model: gpt-4o}") != plain


# ---- a run with a judge -----------------------------------------------------------------------------

def teacher_and_judge(messages: list, index: int, body: dict) -> str:
    if is_judge(messages) or body.get("system") == JUDGE_SYSTEM:
        answer = judged_answer(messages)
        if answer.startswith("good"):
            return "Correct, and polite about it.\nScore: 9"
        if answer.startswith("bad"):
            return "The date is wrong and the tone is rude.\nMore detail on a second line.\nScore: 3"
        if answer.startswith("boom"):
            raise RuntimeError("judge overloaded")
        return "Hard to say."  # no score: unparsed
    question = messages[-1]["content"]
    return "" if question.startswith("empty") else f"{question.split()[0]} answer to {question}"


def test_judge_rejects_below_threshold_counts_its_cost_and_is_never_paid_twice(tmp_path, server, env_key, capsys):
    server.config.responder = teacher_and_judge
    texts = [f"good {i}" for i in range(5)] + ["bad 1", "bad 2", "weird 1", "empty 1", "empty 2", "boom 1"]
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts_file(tmp_path / "p.jsonl", texts),
                          provider="openai", base_url=server.openai_base_url,
                          extra="  checks:\n    - empty\n" + judge_item(server))
    assert main(["generate", str(recipe)]) == 1  # one sample failed: the judge gave no answer after retries
    teacher_bodies, judge_bodies = split(server)
    assert len(teacher_bodies) == 11
    # the empty answers never reached the judge; the failing judgement was tried twice (max_retries: 1)
    assert len(judge_bodies) == 8 + 2 and all(b["model"] == "judge-mini" and b["temperature"] == 0.0 for b in judge_bodies)

    figures = stats(run, capsys)
    assert figures["counts"] == {"accepted": 5, "rejected": 5, "failed": 1, "total": 11}
    assert {k: v["count"] for k, v in figures["rejected_by"].items()} == {"judge": 3, "empty": 2}
    assert figures["rejected_by"]["judge"]["top_reasons"] == [
        ["judge N/N < N: The date is wrong and the tone is rude.", 2], ["judge: unparsed verdict", 1]]
    rejected = {r["prompt_id"]: r for r in read_jsonl(run / "rejected.jsonl")}
    assert rejected["p5"]["checks"][-1] == {"name": "judge", "passed": False, "score": 3,
                                            "reason": "judge 3/10 < 7: The date is wrong and the tone is rude."}
    accepted = read_jsonl(run / "accepted.jsonl")
    assert all(r["checks"][-1] == {"name": "judge", "passed": True, "reason": None, "score": 9} for r in accepted)
    failed = read_jsonl(run / "failed.jsonl")
    assert [f["prompt_id"] for f in failed] == ["p10"] and failed[0]["error"].startswith("judge: HTTP 500")
    assert failed[0]["attempts"] == 2

    manifest = json.loads((run / "manifest.json").read_text())
    judge = manifest["this_run"]["judge"]
    assert judge["requests"] == 8 and judge["cache_hits"] == 0 and judge["cost_usd"] > 0
    assert manifest["totals"]["judge"]["requests"] == 8
    assert figures["judge"]["cost_usd"] == judge["cost_usd"]

    # The judge answers again: the next run retries the failed sample only, with the teacher's answer from
    # the cache, and pays for one judgement.
    server.reset_stats()
    server.config.responder = lambda m, i, b: (
        "Fine.\nScore: 8" if (is_judge(m) or b.get("system") == JUDGE_SYSTEM) else teacher_and_judge(m, i, b))
    assert main(["generate", str(recipe)]) == 0
    assert [len(bodies) for bodies in split(server)] == [0, 1]
    assert len(read_jsonl(run / "accepted.jsonl")) == 6

    # A crash after every answer was paid for and before any record was written: the same command answers
    # everything (the teacher's and the judge's) from cache.sqlite and sends nothing.
    before = {r["id"]: r["rejected_by"] for r in read_jsonl(run / "accepted.jsonl") + read_jsonl(run / "rejected.jsonl")}
    for name in ("accepted.jsonl", "rejected.jsonl"):
        (run / name).unlink()
    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 0
    after = {r["id"]: r["rejected_by"] for r in read_jsonl(run / "accepted.jsonl") + read_jsonl(run / "rejected.jsonl")}
    assert after == before
    judge = json.loads((run / "manifest.json").read_text())["this_run"]["judge"]
    assert judge["requests"] == 0 and judge["cache_hits"] == 9


def test_duplicates_judged_at_the_same_time_are_still_caught(tmp_path, server, env_key):
    """exact_dup before the judge: two equal answers both pass it while neither is accepted yet (each waits on
    its judge); the dedup check runs again before the record is written and rejects the later one."""
    server.config.latency_s = 0.2

    def responder(messages, index, body):
        if body.get("system") == JUDGE_SYSTEM:
            return "Good.\nScore: 8"
        return "the same answer for everyone"

    server.config.responder = responder
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run,
                          prompts=prompts_file(tmp_path / "p.jsonl", [f"q {i}" for i in range(4)]),
                          provider="openai", base_url=server.openai_base_url,
                          extra="  checks:\n    - exact_dup\n" + judge_item(server, "anthropic", "claude-haiku-4-5"))
    assert main(["generate", str(recipe)]) == 0
    accepted, rejected = read_jsonl(run / "accepted.jsonl"), read_jsonl(run / "rejected.jsonl")
    assert len(accepted) == 1 and len(rejected) == 3
    for record in rejected:
        names = [(c["name"], c["passed"]) for c in record["checks"]]
        assert names == [("exact_dup", True), ("judge", True), ("exact_dup", False)]
        assert record["rejected_by"] == "exact_dup"
        assert record["checks"][-1]["reason"] == f"exact duplicate of {accepted[0]['id']}"
