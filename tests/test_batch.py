"""`teacher.mode: batch` end to end through the real openai and anthropic SDKs against the fake server's
batch endpoints: splitting, out-of-order results, resending expired items, failures as records, the batch
price, a second run that sends nothing, adoption of a batch submitted just before a crash, and kill -9
between submit and fetch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import API_KEY, PYTHON, REPO, read_jsonl, write_prompts, write_recipe

from factory.__main__ import main
from factory.pricing import lookup

BATCH = "    mode: batch\n    batch: {{max_requests: {max_requests}, poll_s: 0.05, poll_max_s: 0.2}}\n"


def batch_recipe(tmp_path: Path, server, provider: str, *, prompts: int, n: int, max_requests: int,
                 extra: str = "") -> tuple[Path, Path]:
    run = tmp_path / "run"
    base_url = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    model = "gpt-4o-mini" if provider == "openai" else "claude-3-5-haiku-latest"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", prompts),
                          provider=provider, base_url=base_url, model=model, n=n,
                          extra_teacher=BATCH.format(max_requests=max_requests), extra=extra)
    return recipe, run


def ledger(run: Path) -> list[dict]:
    return read_jsonl(run / "batches.jsonl")


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_openai_batches_split_fetch_price_and_a_second_run_sends_nothing(tmp_path, server, env_key):
    server.config.batch_delay_s = 0.1
    recipe, run = batch_recipe(tmp_path, server, "openai", prompts=10, n=2, max_requests=4)
    assert main(["generate", str(recipe)]) == 0
    accepted = read_jsonl(run / "accepted.jsonl")
    assert len(accepted) == 20 and len({r["id"] for r in accepted}) == 20
    stats = server.stats
    assert stats.batches_created == 3 and stats.files_uploaded == 3  # 10 requests (n=2 each) in 4 + 4 + 2
    assert max(stats.batch_items.values()) == 1 and len(stats.batch_items) == 10
    assert stats.answered == {} and stats.by_status.get(429, 0) == 0, "nothing sent online"
    m = manifest(run)
    assert m["status"] == "complete" and m["this_run"]["requests"] == 10 and m["this_run"]["cache_hits"] == 0
    assert m["batches"]["fetched"] == 3 and m["batches"]["open"] == []
    rates = lookup("gpt-4o-mini", "openai")
    price_in, price_out = rates.input, rates.output
    tokens_in, tokens_out = m["this_run"]["input_tokens"], m["this_run"]["output_tokens"]
    # The batch price: half the list price (the manifest rounds to micro-dollars).
    assert m["this_run"]["cost_usd"] == round(0.5 * (tokens_in * price_in + tokens_out * price_out) / 1e6, 6)
    events = Counter(e["event"] for e in ledger(run))
    assert events["prepared"] == events["uploaded"] == events["submitted"] == events["fetched"] == 3
    # Same records as the online path: the request body is the one an online run would send.
    assert accepted[0]["teacher"]["provider"] == "openai" and accepted[0]["usage"]["shared_by"] == 2

    created = stats.batches_created
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.batches_created == created  # answered from the store: nothing submitted
    assert len(read_jsonl(run / "accepted.jsonl")) == 20


def test_anthropic_expired_items_are_sent_again_and_invalid_ones_fail_until_the_next_run(tmp_path, server, env_key):
    expired, invalid = set(), set()

    def fault(custom_id: str, attempt: int) -> str | None:
        # The 3rd and 7th distinct requests expire on their first try; the 5th is refused on its first try.
        order = fault.seen.setdefault(custom_id, len(fault.seen) + 1)
        if attempt == 1 and order in (3, 7):
            expired.add(custom_id)
            return "expired"
        if attempt == 1 and order == 5:
            invalid.add(custom_id)
            return "invalid"
        return None

    fault.seen = {}
    server.config.batch_fault = fault
    recipe, run = batch_recipe(tmp_path, server, "anthropic", prompts=6, n=2, max_requests=5)
    assert main(["generate", str(recipe)]) == 1  # one failure: complete_with_failures
    accepted = read_jsonl(run / "accepted.jsonl")
    failed = read_jsonl(run / "failed.jsonl")
    assert len(accepted) == 11 and len(failed) == 1
    assert "invalid_request_error" in failed[0]["error"] and "not retryable" in failed[0]["error"]
    # 12 requests (no n at Anthropic) in 5 + 5 + 2, then one batch resending the two expired ones.
    assert server.stats.batches_created == 4
    assert all(server.stats.batch_items[key] == 2 for key in expired)
    assert all(server.stats.batch_items[key] == 1 for key in invalid)
    rounds = [e["round"] for e in ledger(run) if e["event"] == "prepared"]
    assert rounds == [0, 0, 0, 1]

    assert main(["generate", str(recipe)]) == 0  # the failure is retried in a new batch, and answered
    assert len(read_jsonl(run / "accepted.jsonl")) == 12 and read_jsonl(run / "failed.jsonl") == []
    assert server.stats.batches_created == 5 and all(server.stats.batch_items[key] == 2 for key in invalid)


def test_budget_stops_before_a_batch_that_could_exceed_it(tmp_path, server, env_key, capsys):
    recipe, run = batch_recipe(tmp_path, server, "openai", prompts=8, n=1, max_requests=4,
                               extra="  budget_usd: 0.0001\n")
    assert main(["generate", str(recipe)]) == 1
    # One batch's worst case (4 × (input + 64 output tokens) at half the gpt-4o-mini price) fits; two do not.
    assert server.stats.batches_created == 1
    assert manifest(run)["status"] == "budget_exhausted"
    assert "budget_usd=0.0001 reached" in capsys.readouterr().err


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_batch_submitted_just_before_a_crash_is_found_not_sent_again(tmp_path, server, env_key, provider,
                                                                       monkeypatch):
    """The crash window between the provider accepting a batch and the ledger recording its id."""
    from factory import batch as batch_module

    server.config.batch_delay_s = 0.3
    recipe, run = batch_recipe(tmp_path, server, provider, prompts=3, n=1, max_requests=10)
    real_append = batch_module.Ledger.append

    def crash_on_submitted(self, event):
        if event["event"] == "submitted":
            raise SystemExit("simulated crash")
        real_append(self, event)

    monkeypatch.setattr(batch_module.Ledger, "append", crash_on_submitted)
    with pytest.raises(SystemExit):
        main(["generate", str(recipe)])
    assert server.stats.batches_created == 1
    monkeypatch.setattr(batch_module.Ledger, "append", real_append)
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.batches_created == 1  # found at the provider (metadata, or count and time)
    assert len(read_jsonl(run / "accepted.jsonl")) == 3
    assert any(e.get("adopted") for e in ledger(run))


@pytest.mark.parametrize("provider,lost", [("openai", "drop"), ("anthropic", "500")])
def test_a_create_whose_answer_is_lost_is_looked_up_not_sent_twice(tmp_path, server, env_key, provider, lost):
    """The provider accepts the batch, then the answer is lost (connection reset, or a 5xx after accepting)."""
    server.config.batch_delay_s = 0.2
    server.config.batch_create_lost = [lost]
    recipe, run = batch_recipe(tmp_path, server, provider, prompts=3, n=1, max_requests=10)
    assert main(["generate", str(recipe)]) == 0
    stats = server.stats
    assert stats.batches_created == 1, "the batch exists once at the provider"
    assert max(stats.batch_items.values()) == 1 and max(stats.batch_answered.values()) == 1, "nothing paid twice"
    assert len(read_jsonl(run / "accepted.jsonl")) == 3
    assert manifest(run)["this_run"]["requests"] == 3
    events = ledger(run)
    assert [e["event"] for e in events if e["event"] in ("submitted", "candidates")] == (
        ["submitted"] if provider == "openai" else ["candidates", "submitted"])
    assert events[-2]["event"] == "submitted" and events[-2]["adopted"], "found by the lookup, then fetched"


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted-before-the-crash", "never-sent"])
def test_anthropic_candidates_are_told_apart_by_their_results(tmp_path, server, env_key, monkeypatch, accepted):
    """Another client's batch with as many requests, created in the same window, is a candidate too: it is
    dismissed by its results, and ours is adopted, or sent when it never reached the provider."""
    import anthropic

    from factory import batch as batch_module
    from factory.teachers.anthropic import AnthropicTeacher

    server.config.batch_delay_s = 0.2
    recipe, run = batch_recipe(tmp_path, server, "anthropic", prompts=3, n=1, max_requests=10)

    def crash(*args, **kwargs):
        raise SystemExit("simulated crash")

    if accepted:
        real_append = batch_module.Ledger.append
        monkeypatch.setattr(batch_module.Ledger, "append",
                            lambda self, event: crash() if event["event"] == "submitted" else real_append(self, event))
    else:
        monkeypatch.setattr(AnthropicTeacher, "submit_batch", crash)
    with pytest.raises(SystemExit):
        main(["generate", str(recipe)])
    monkeypatch.undo()
    monkeypatch.setenv("APPRENTICE_TEST_KEY", API_KEY)
    client = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key=API_KEY, max_retries=0)
    foreign = client.messages.batches.create(requests=[
        {"custom_id": f"other-{i}", "params": {"model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": f"not ours {i}"}]}} for i in range(3)])

    assert main(["generate", str(recipe)]) == 0
    events = ledger(run)
    [candidates] = [e["ids"] for e in events if e["event"] == "candidates"]
    assert foreign.id in candidates and len(candidates) == (2 if accepted else 1)
    dismissed = [e["id"] for e in events if e["event"] == "not_ours"]
    # Once ours is confirmed the others no longer matter; with ours never sent, the other one is dismissed.
    assert dismissed in ([[], [foreign.id]] if accepted else [[foreign.id]])
    assert [e["provider_id"] for e in events if e["event"] == "submitted"] != [foreign.id]
    assert server.stats.batches_created == 2, "ours once (adopted, or sent once none was ours) and the other one"
    ours = {key: count for key, count in server.stats.batch_answered.items() if not key.startswith("other-")}
    assert len(ours) == 3 and max(ours.values()) == 1
    accepted_records = read_jsonl(run / "accepted.jsonl")
    assert sorted(r["completion"][0]["content"] for r in accepted_records) == [f"Answer 0: question {i}"
                                                                               for i in range(3)]
    assert manifest(run)["this_run"]["requests"] == 3, "the other batch's results are not ours to count"


def test_kill_9_between_submit_and_fetch_resubmits_nothing_and_loses_nothing(tmp_path, server, env_key):
    server.config.batch_delay_s = 3.0
    recipe, run = batch_recipe(tmp_path, server, "openai", prompts=30, n=2, max_requests=8)
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    proc = subprocess.Popen([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(1 for e in ledger(run) if e["event"] == "submitted") == 4:  # 30 requests in 8 + 8 + 8 + 6
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert server.stats.batches_created == 4
    assert not (run / "accepted.jsonl").exists() or read_jsonl(run / "accepted.jsonl") == [], "killed before fetch"
    items_before = dict(server.stats.batch_items)

    done = subprocess.run([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert server.stats.batches_created == 4 and server.stats.files_uploaded == 4  # nothing resubmitted
    assert dict(server.stats.batch_items) == items_before and max(items_before.values()) == 1
    accepted = read_jsonl(run / "accepted.jsonl")
    assert len(accepted) == 60 and len({r["id"] for r in accepted}) == 60  # nothing lost, nothing twice
    assert manifest(run)["this_run"]["requests"] == 30


def test_batch_mode_is_for_hosted_providers(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"factory:\n  output_dir: {run}\n  prompts: {{path: {write_prompts(tmp_path / 'p.jsonl', 1)}}}\n"
                      "  teacher: {provider: local, mode: batch}\n", encoding="utf-8")
    assert main(["generate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "mode: batch is for provider openai or anthropic" in err and "factory.teacher" in err


def test_batch_answers_go_through_the_judge_and_best_of_like_online_ones(tmp_path, server, env_key, capsys):
    from test_judge_bestof import best_of_recipe, best_of_responder, stats

    server.config.responder = best_of_responder({"openai": True})
    run = tmp_path / "run"
    recipe = best_of_recipe(tmp_path, server, "openai", "judge", run)
    recipe.write_text(recipe.read_text().replace("    max_concurrency: 1\n", "    max_concurrency: 1\n"
                                                  + BATCH.format(max_requests=10)))
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.batches_created == 1 and len(server.stats.batch_items) == 4  # the teacher: one batch
    figures = stats(run, capsys)  # the same decisions as the online run in test_judge_bestof
    assert figures["counts"] == {"accepted": 3, "rejected": 13, "failed": 0, "total": 16}
    assert {k: v["count"] for k, v in figures["rejected_by"].items()} == {
        "best_of": 6, "judge": 5, "empty": 1, "exact_dup": 1}
    assert sorted(r["completion"][0]["content"] for r in read_jsonl(run / "accepted.jsonl")) == [
        "s8 q1 c", "s9 q0 b", "s9 same q3"]
