"""The LLM-judge check and best-of-n, through the real openai/anthropic SDKs against the fake server: the
server's responder plays both the teacher and the judge (it tells them apart by the judge's system prompt)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import read_jsonl, write_recipe

from apprentice.errors import RecipeError
from factory.__main__ import main
from factory.recipe import load_factory_config
from quality_checks.judging import JUDGE_SYSTEM, parse_judgement


def is_judge(messages: list) -> bool:
    return messages[0].get("role") == "system" and messages[0]["content"] == JUDGE_SYSTEM


def judged_answer(messages: list) -> str:
    """The answer text inside a judge prompt."""
    prompt = messages[-1]["content"]
    return prompt.split("Answer:\n", 1)[1].split("\n\nRubric:", 1)[0]


def verdict(body: dict, rationale: str, score: int) -> dict | str:
    """The judge's answer in the form its request asks for: the structured object where the body asks for
    one (OpenAI response_format, Anthropic's forced tool), else text with a last line `Score: N`."""
    if body.get("response_format") or body.get("tools"):
        return {"rationale": rationale, "score": score}
    return f"{rationale}\nScore: {score}"


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

def teacher_and_judge(messages: list, index: int, body: dict) -> dict | str:
    if is_judge(messages) or body.get("system") == JUDGE_SYSTEM:
        answer = judged_answer(messages)
        if answer.startswith("good"):
            return verdict(body, "Correct, and polite about it.", 9)
        if answer.startswith("bad"):
            return verdict(body, "The date is wrong and the tone is rude.\nMore detail on a second line.", 3)
        if answer.startswith("boom"):
            raise RuntimeError("judge overloaded")
        return verdict(body, "Hard to say. " * 100, 5)  # cut at the judge's max_tokens: no score, unparsed
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
    assert main(["stats", str(run)]) == 0
    assert "judge cost" in capsys.readouterr().out

    # The judge answers again: the next run retries the failed sample only, with the teacher's answer from
    # the cache, and pays for one judgement.
    server.reset_stats()
    server.config.responder = lambda m, i, b: (
        verdict(b, "Fine.", 8) if (is_judge(m) or b.get("system") == JUDGE_SYSTEM) else teacher_and_judge(m, i, b))
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
            return verdict(body, "Good.", 8)
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


def test_equal_samples_of_one_request_are_duplicates_with_or_without_a_judge(tmp_path, server, env_key):
    server.config.responder = lambda m, i, b: verdict(b, "Good.", 8) if is_judge(m) else f"the same answer to {m[-1]['content']}"
    prompts = prompts_file(tmp_path / "p.jsonl", ["q 0", "q 1"])
    for name, judge in (("plain", ""), ("judged", judge_item(server))):
        run = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", output_dir=run, prompts=prompts, provider="openai",
                              base_url=server.openai_base_url, n=3, extra="  checks:\n    - exact_dup\n" + judge)
        assert main(["generate", str(recipe)]) == 0
        assert len(read_jsonl(run / "accepted.jsonl")) == 2
        assert [r["rejected_by"] for r in read_jsonl(run / "rejected.jsonl")] == ["exact_dup"] * 4


# ---- best-of-n --------------------------------------------------------------------------------------

# Per prompt, the answers of its 4 samples; "s<k>" is the score the judge (or the verifier) gives it.
BEST_OF = {
    "q0": ["s6 q0 a", "s9 q0 b", "s4 q0 c", "s9 q0 d"],   # s4 below the judge's threshold; s9 twice: the first is kept
    "q1": ["", "s7 q1 b", "s8 q1 c", "s5 q1 d"],          # an empty answer never reaches the judge
    "q2": ["s1 q2 a", "s2 q2 b", "s3 q2 c", "s4 q2 d"],   # all below the threshold: nothing kept
    "q3": ["s9 same q3", "s9 same q3", "s6 q3 c", "s7 q3 d"],  # the best twice: one kept, one exact_dup
}
VERIFIER = ("import re\nfrom quality_checks import Verdict\n"
            "def score(sample):\n    m = re.match(r's(\\d+)', sample.text)\n"
            "    return Verdict(True, None, float(m.group(1))) if m else Verdict(False, 'no score')\n")


def best_of_responder(calls: dict):
    """Teacher and judge. The anthropic teacher has no `n`: its 4 requests of a prompt are the same body,
    so the k-th request for a prompt gets the k-th answer (answers come from the cache on resume)."""
    def respond(messages, index, body):
        if is_judge(messages) or body.get("system") == JUDGE_SYSTEM:
            score = int(judged_answer(messages).split()[0][1:])
            return verdict(body, "Rated by the table.", score)
        prompt = messages[-1]["content"]
        if "n" not in body and body.get("system") is None and "anthropic" in calls:
            index = calls.setdefault(prompt, 0)
            calls[prompt] += 1
        return BEST_OF[prompt][index]
    return respond


def best_of_recipe(tmp_path: Path, server, provider: str, by: str, run: Path) -> Path:
    model = "claude-haiku-4-5" if provider == "anthropic" else "gpt-4o-mini"
    url = server.anthropic_base_url if provider == "anthropic" else server.openai_base_url
    scorer = judge_item(server).replace("threshold: 7", "threshold: 5") if by == "judge" else \
        "    - {name: verifier, function: 'bestof_verifiers:score'}\n    - {name: judge, label: floor, rubric: r, threshold: 5, " \
        f"teacher: {{provider: openai, model: judge-mini, base_url: {server.openai_base_url}, api_key_env: APPRENTICE_TEST_KEY}}}}\n"
    return write_recipe(tmp_path / f"{run.name}.yaml", output_dir=run,
                        prompts=prompts_file(tmp_path / "p.jsonl", list(BEST_OF)), provider=provider, base_url=url,
                        model=model, n=4, extra_teacher="    max_concurrency: 1\n",
                        extra=f"  checks:\n    - empty\n    - exact_dup\n{scorer}  best_of: {{by: {by}, keep: 1}}\n")


def outcome(run: Path) -> dict:
    records = read_jsonl(run / "accepted.jsonl") + read_jsonl(run / "rejected.jsonl")
    assert len(records) == len({r["id"] for r in records})
    return {(r["prompt_id"], r["sample_index"]): (r["completion"][0]["content"], r["rejected_by"], r["checks"][-1]["reason"])
            for r in records}


@pytest.mark.parametrize("provider, by", [("openai", "judge"), ("anthropic", "verifier")])
def test_best_of_keeps_the_best_sample_of_each_prompt(tmp_path, server, env_key, capsys, monkeypatch, provider, by):
    (tmp_path / "bestof_verifiers.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    server.config.responder = best_of_responder({provider: True})
    run = tmp_path / "run"
    assert main(["generate", str(best_of_recipe(tmp_path, server, provider, by, run))]) == 0
    figures = stats(run, capsys)
    assert figures["counts"] == {"accepted": 3, "rejected": 13, "failed": 0, "total": 16}
    floor = "judge" if by == "judge" else "floor"
    assert {k: v["count"] for k, v in figures["rejected_by"].items()} == {
        "best_of": 6, floor: 5, "empty": 1, "exact_dup": 1}
    assert dict(map(tuple, figures["rejected_by"]["best_of"]["top_reasons"])) == {
        "score N < best N of N": 5, "score N = best N of N (ties go to the first sample)": 1}
    accepted = {r["prompt_id"]: r for r in read_jsonl(run / "accepted.jsonl")}
    assert {p: r["completion"][0]["content"] for p, r in accepted.items()} == {
        "p0": "s9 q0 b", "p1": "s8 q1 c", "p3": "s9 same q3"} if provider == "openai" else True
    assert sorted(r["completion"][0]["content"] for r in accepted.values()) == ["s8 q1 c", "s9 q0 b", "s9 same q3"] \
        or provider == "anthropic"  # which of two equal answers is "first" follows the order requests arrived
    assert all(r["checks"][-1] == {"name": "best_of", "passed": True, "reason": None, "score": 9 if r["prompt_id"] != "p1" else 8}
               for r in accepted.values())
    reasons = {(r["prompt_id"], r["completion"][0]["content"]): r["checks"][-1]["reason"]
               for r in read_jsonl(run / "rejected.jsonl") if r["rejected_by"] == "best_of"}
    assert reasons[("p0", "s6 q0 a")] == "score 6 < best 9 of 4"
    assert reasons[("p3", "s7 q3 d")] == "score 7 < best 9 of 4"
    dup = [r for r in read_jsonl(run / "rejected.jsonl") if r["rejected_by"] == "exact_dup"][0]
    assert dup["checks"][-1]["reason"] == f"exact duplicate of {accepted['p3']['id']}"
    # the review tools key on rejected_by: best_of is one more reason
    capsys.readouterr()
    assert main(["review", str(run)]) == 0
    assert "best_of" in capsys.readouterr().out


class Crash(Exception):
    pass


def cached(run: Path) -> int:
    import sqlite3

    with sqlite3.connect(run / "cache.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_best_of_after_a_crash_at_any_write_decides_as_an_uninterrupted_run(tmp_path, server, env_key, monkeypatch, provider):
    """A crash between two record writes, also in the middle of a prompt's samples, then the same command:
    the same records as a run that was never interrupted, and no answer (the teacher's or the judge's) paid twice."""
    from factory.store import Store

    if provider == "openai":
        responder = best_of_responder({})
    else:
        # Without `n` the 4 requests of a prompt are one body: answers given to requests lost in the crash
        # would shift which slot gets which answer, so every slot of a prompt gets the same one here (ties
        # and duplicates: the first slot is kept, the others are exact_dup in the order best_of writes them).
        def responder(messages, index, body, table={"q0": "s9 q0", "q1": "", "q2": "s3 q2", "q3": "s7 q3"}):
            if is_judge(messages):
                return best_of_responder({})(messages, index, body)
            return table[messages[-1]["content"]]
    server.config.responder = responder
    straight = tmp_path / "straight"
    assert main(["generate", str(best_of_recipe(tmp_path, server, provider, "judge", straight))]) == 0
    expected = outcome(straight)
    assert len(expected) == 16
    write = Store.write
    kept_then_cut = 0  # crashes that left a prompt with its best sample written and others not
    for crash_after in (1, 3, 4, 6, 9, 13, 15):
        run = tmp_path / f"crash{crash_after}"
        recipe = best_of_recipe(tmp_path, server, provider, "judge", run)
        written = []

        def crashing(self, name, line, written=written, crash_after=crash_after):
            if len(written) == crash_after:
                raise Crash(f"killed after {crash_after} records")
            written.append(name)
            write(self, name, line)

        monkeypatch.setattr(Store, "write", crashing)
        with pytest.raises(Crash):
            main(["generate", str(recipe)])
        monkeypatch.setattr(Store, "write", write)
        written_by_prompt = Counter(r["prompt_id"] for r in read_jsonl(run / "rejected.jsonl"))
        for record in read_jsonl(run / "accepted.jsonl"):
            written_by_prompt[record["prompt_id"]] += 1
            kept_then_cut += written_by_prompt[record["prompt_id"]] < 4
        paid_before = cached(run)
        server.reset_stats()
        assert main(["generate", str(recipe)]) == 0
        assert outcome(run) == expected, crash_after
        # what was paid for before the crash came from the cache; only the rest was sent
        assert server.stats.total == cached(run) - paid_before == cached(straight) - paid_before, crash_after
    assert kept_then_cut


def test_best_of_options_are_checked_against_the_checks(tmp_path):
    def load(text: str):
        path = tmp_path / "r.yaml"
        path.write_text("factory:\n  prompts: {path: p.jsonl}\n" + text)
        return load_factory_config(path)

    judge = "    - {name: judge, label: quality, rubric: r, teacher: {provider: openai, model: gpt-4o-mini}}\n"
    config = load(f"  samples_per_prompt: 4\n  checks:\n    - empty\n{judge}  best_of: {{by: judge}}\n")
    assert config.fingerprint()["best_of"] == {"by": "judge", "keep": 1}
    from factory.recipe import ranking_check
    assert ranking_check("judge", config.checks) == "quality" == ranking_check("quality", config.checks)
    with pytest.raises(RecipeError) as info:
        load(f"  samples_per_prompt: 2\n  checks:\n    - empty\n{judge}  best_of: {{by: verifier, keep: 2, top: 1}}\n")
    text = str(info.value)
    assert "factory.best_of.top: unknown key" in text
    with pytest.raises(RecipeError, match=r"factory\.best_of: Value error, keep: 2 of samples_per_prompt 2 keeps every"):
        load(f"  samples_per_prompt: 2\n  checks:\n    - empty\n{judge}  best_of: {{by: verifier, keep: 2}}\n")
    with pytest.raises(RecipeError, match=r"factory\.best_of: Value error, by: no check 'verifier' in factory.checks "
                                          r"\(empty, quality\)"):
        load(f"  samples_per_prompt: 3\n  checks:\n    - empty\n{judge}  best_of: {{by: verifier}}\n")


def test_best_of_prompt_with_a_failed_sample_is_failed_whole_and_decided_by_the_next_run(tmp_path, server, env_key):
    broken = {"on": True}
    judge_of = best_of_responder({})

    def responder(messages, index, body):
        if is_judge(messages) and broken["on"] and judged_answer(messages) == "s6 q0 a":
            raise RuntimeError("judge down")
        return judge_of(messages, index, body)

    server.config.responder = responder
    run = tmp_path / "run"
    recipe = best_of_recipe(tmp_path, server, "openai", "judge", run)
    assert main(["generate", str(recipe)]) == 1
    failed = read_jsonl(run / "failed.jsonl")
    assert sorted(f["sample_index"] for f in failed) == [0, 1, 2, 3] and {f["prompt_id"] for f in failed} == {"p0"}
    errors = {f["sample_index"]: f["error"] for f in failed}
    assert errors[0].startswith("judge: HTTP 500") and errors[1].startswith("best_of: another sample of this prompt")
    assert len(read_jsonl(run / "accepted.jsonl")) == 2

    broken["on"] = False
    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0
    assert [len(bodies) for bodies in split(server)] == [0, 1]  # only the judgement that failed
    assert {r["prompt_id"]: r["completion"][0]["content"] for r in read_jsonl(run / "accepted.jsonl")}["p0"] == "s9 q0 b"


def test_judge_cost_counts_against_the_budget(tmp_path, server, env_key):
    server.config.responder = lambda m, i, b: verdict(b, "Fine.", 8) if is_judge(m) else f"answer to {m[-1]['content']}"
    run = tmp_path / "run"
    judge = judge_item(server).replace("price: {input: 1, output: 2}", "price: {input: 1000, output: 1000}")
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run,
                          prompts=prompts_file(tmp_path / "p.jsonl", [f"q {i}" for i in range(20)]),
                          provider="openai", base_url=server.openai_base_url, extra_teacher="    max_concurrency: 2\n",
                          extra="  budget_usd: 1.0\n  checks:\n    - empty\n" + judge)
    assert main(["generate", str(recipe)]) == 1
    manifest = json.loads((run / "manifest.json").read_text())
    spent = manifest["this_run"]["cost_usd"] + manifest["this_run"]["judge"]["cost_usd"]
    assert manifest["status"] == "budget_exhausted" and 0 < spent <= 1.0
    assert 0 < len(read_jsonl(run / "accepted.jsonl")) < 20
    assert main(["generate", str(recipe), "--set", "factory.budget_usd=100"]) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 20 and server.stats.duplicates() == {}
