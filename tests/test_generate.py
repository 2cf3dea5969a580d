"""`python -m factory generate` end to end, through the real openai and anthropic SDKs against the
loopback fake server: n > 1, resume, faults, failures as records, budget, recipe changes, secrets."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import API_KEY, PYTHON, REPO, read_jsonl, write_prompts, write_recipe

from factory.__main__ import main


def generate(recipe: Path, *extra: str) -> int:
    return main(["generate", str(recipe), *extra])


def start_generate(recipe: Path, accepted: Path, lines: int, **popen) -> subprocess.Popen:
    """Start `python -m factory generate` in a subprocess; return once `accepted` has `lines` lines."""
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    proc = subprocess.Popen([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env, **popen)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (accepted.exists() and accepted.read_bytes().count(b"\n") >= lines):
        time.sleep(0.01)
    return proc


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_openai_n_samples_in_one_request_and_second_run_sends_nothing(tmp_path, server, env_key):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, n=3)
    assert generate(recipe) == 0
    accepted = read_jsonl(run / "accepted.jsonl")
    assert len(accepted) == 18 and len({r["id"] for r in accepted}) == 18
    assert server.stats.total == 6  # the API's n: one request per prompt
    assert all(body.get("n") == 3 for body in server.stats.bodies)
    record = accepted[0]
    assert record["prompt"][-1]["role"] == "user" and record["completion"][0]["role"] == "assistant"
    assert record["teacher"]["provider"] == "openai" and record["usage"]["shared_by"] == 3
    assert {r["sample_index"] for r in accepted} == {0, 1, 2}
    m = manifest(run)
    assert m["status"] == "complete" and m["counts"]["accepted"] == 18 and m["this_run"]["requests"] == 6

    server.reset_stats()
    assert generate(recipe) == 0
    assert server.stats.total == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 18

    # The record is TRL's conversational prompt-completion format: datasets reads it as it is.
    import datasets

    data = datasets.load_dataset("json", data_files=str(run / "accepted.jsonl"), split="train")
    assert data.num_rows == 18 and data[0]["completion"][0]["role"] == "assistant"


def test_anthropic_one_request_per_sample_with_system_prompt(tmp_path, server, env_key):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="anthropic",
                          base_url=server.anthropic_base_url, model="claude-haiku-4-5", n=2)
    assert generate(recipe, "--set", "factory.prompts.system=Be brief.") == 0
    accepted = read_jsonl(run / "accepted.jsonl")
    assert len(accepted) == 8
    assert server.stats.total == 8
    assert all(body["system"] == "Be brief." for body in server.stats.bodies)
    assert all(m["role"] != "system" for body in server.stats.bodies for m in body["messages"])
    assert accepted[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert manifest(run)["this_run"]["cost_usd"] > 0


def test_transient_faults_are_retried_and_counted(tmp_path, server, env_key):
    server.config.faults.update({1: "429", 2: "500", 3: "drop", 4: "malformed", 5: "503"})
    server.config.retry_after = 0.2
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 8),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 8
    assert read_jsonl(run / "failed.jsonl") == []
    this_run = manifest(run)["this_run"]
    assert this_run["retries"] == 5 and this_run["rate_limited"] == 1 and this_run["server_errors"] == 4


def test_prompts_waiting_out_a_retry_after_leave_their_sending_slots_to_the_next_prompts(tmp_path, server, env_key):
    # Four sending slots; the first four requests are refused with a 429 that asks for 0.4 s (twenty round trips).
    # The refused prompts wait without holding a slot: the next prompts are answered meanwhile.
    server.config.latency_s = 0.02
    server.config.retry_after = 0.4
    for seq in range(1, 5):
        server.config.faults[seq] = "429"
    answered: list[str] = []
    server.config.responder = lambda messages, index, body: answered.append(messages[-1]["content"]) or "ok"
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 12),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    max_concurrency: 4\n    follow_latency: false\n")
    assert generate(recipe) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 12 and server.stats.faults["429"] == 4
    refused = {f"question {i}" for i in range(4)}  # prompts go out in order: the first four are the refused
    assert refused.isdisjoint(answered[:8]), f"the next prompts were answered while they waited: {answered}"


def test_persistent_errors_become_failed_records_and_are_retried_on_resume(tmp_path, server, env_key):
    server.config.fault_rates["500"] = 1.0
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 3),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    max_retries: 1\n")
    assert generate(recipe) == 1
    failed = read_jsonl(run / "failed.jsonl")
    assert len(failed) == 3 and all(f["status"] == 500 and f["attempts"] == 2 for f in failed)
    assert "HTTP 500" in failed[0]["error"]
    assert manifest(run)["status"] == "complete_with_failures"

    server.config.fault_rates.clear()
    assert generate(recipe) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 3
    assert read_jsonl(run / "failed.jsonl") == []
    assert len(read_jsonl(run / "failed_history.jsonl")) == 3


def test_rejected_samples_keep_their_reason(tmp_path, server, env_key):
    def responder(messages, index, body):
        text = messages[-1]["content"]
        if text.endswith(" 0"):
            return "I'm sorry, but I can't help with that."
        if text.endswith(" 1"):
            return "   "
        if text.endswith(" 2"):
            return "word " * 200  # longer than max_tokens: finish_reason length
        return "A fine answer."

    server.config.responder = responder
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 5),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 0
    rejected = {r["prompt_id"]: r for r in read_jsonl(run / "rejected.jsonl")}
    assert rejected["p0"]["rejected_by"] == "refusal"
    assert rejected["p1"]["rejected_by"] == "empty"
    assert rejected["p2"]["rejected_by"] == "truncated" and rejected["p2"]["finish_reason"] == "length"
    assert rejected["p0"]["checks"][-1]["reason"].startswith("refusal")
    assert len(read_jsonl(run / "accepted.jsonl")) == 2
    assert manifest(run)["counts"]["rejected_by"] == {"refusal": 1, "empty": 1, "truncated": 1}


def test_budget_stops_new_requests_before_it_is_exceeded(tmp_path, server, env_key):
    run = tmp_path / "run"
    # 64 max tokens at $1000 per 1M output tokens: each request may cost up to ~$0.064.
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 40),
        provider="openai", base_url=server.openai_base_url,
        extra_teacher="    price: {input: 1000, output: 1000}\n    max_concurrency: 4\n", extra="  budget_usd: 0.5\n",
    )
    assert generate(recipe) == 1
    m = manifest(run)
    assert m["status"] == "budget_exhausted"
    assert 0 < m["this_run"]["cost_usd"] <= 0.5
    assert 0 < server.stats.total < 40
    # the budget is for the run directory: the same command again may use what the first run's reservations
    # held back, never more than the budget in all
    assert generate(recipe) == 1
    assert manifest(run)["status"] == "budget_exhausted" and manifest(run)["totals"]["cost_usd"] <= 0.5
    assert server.stats.total < 40
    # raising the budget resumes where it stopped
    assert generate(recipe, "--set", "factory.budget_usd=100") == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 40


def test_changed_recipe_is_refused_with_the_keys_that_differ(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 2),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 0
    server.reset_stats()
    assert generate(recipe, "--set", "factory.teacher.model=gpt-4o") == 2
    err = capsys.readouterr().err
    assert "model" in err and "gpt-4o-mini" in err and "output_dir" in err
    assert server.stats.total == 0
    # settings that do not change samples are fine
    assert generate(recipe, "--set", "factory.teacher.max_concurrency=3") == 0


def test_bad_prompt_line_fails_before_any_request(tmp_path, server, env_key, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    with prompts.open("a") as handle:
        handle.write('{"prompt": 42}\n')
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=prompts, provider="openai",
                          base_url=server.openai_base_url)
    assert generate(recipe) == 2
    assert f"{prompts}:4:" in capsys.readouterr().err
    assert server.stats.total == 0


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("APPRENTICE_TEST_KEY", raising=False)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run",
                          prompts=write_prompts(tmp_path / "p.jsonl", 1), provider="anthropic", base_url="null")
    assert generate(recipe) == 2
    err = capsys.readouterr().err
    assert "APPRENTICE_TEST_KEY is not set" in err and "provider: local" in err


def test_rejected_key_stops_the_run_and_never_leaks(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("APPRENTICE_TEST_KEY", "sk-wrong-key-XYZ")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 20),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 1
    err = capsys.readouterr().err
    assert "API key was rejected" in err and "sk-wrong-key-XYZ" not in err
    assert manifest(run)["status"] == "stopped"
    assert read_jsonl(run / "failed.jsonl") == []  # not the prompts' fault: the same command retries them
    assert server.stats.total < 20


def test_api_key_never_reaches_the_run_directory(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    server.config.faults[2] = "500"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 5),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 0
    output = capsys.readouterr()
    assert API_KEY not in output.out + output.err
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"accepted.jsonl", "manifest.json", "cache.sqlite"}
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


def test_limit_takes_the_first_prompts(tmp_path, server, env_key):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 10),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe, "--limit", "4") == 0
    assert sorted(r["prompt_id"] for r in read_jsonl(run / "accepted.jsonl")) == ["p0", "p1", "p2", "p3"]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_loses_nothing_and_pays_nothing_twice(tmp_path, server, env_key):
    server.config.latency_s = 0.03
    total = 400
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", total),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    max_concurrency: 16\n")
    accepted = run / "accepted.jsonl"
    proc = start_generate(recipe, accepted, 100, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines_at_kill = accepted.read_bytes().count(b"\n")
    assert 100 <= lines_at_kill < total, "the kill must land mid-run"
    # A torn write, as a crash can leave: the next start must cut it off.
    with accepted.open("ab") as handle:
        handle.write(b'{"id": "deadbeef", "prompt": [{"role"')
    with sqlite3.connect(run / "cache.sqlite") as db:
        paid_before = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert paid_before >= lines_at_kill

    server.reset_stats()
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    done = subprocess.run([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in accepted.read_text().splitlines()]  # every line parses
    assert len(records) == total
    assert len({r["id"] for r in records}) == total
    assert sorted(int(r["prompt_id"][1:]) for r in records) == list(range(total))
    # Everything paid for before the kill came from the cache: only the rest was sent.
    assert server.stats.total == total - paid_before
    assert max(server.stats.answered.values()) == 1
    assert manifest(run)["this_run"]["repaired_bytes"] == {"accepted.jsonl": len(b'{"id": "deadbeef", "prompt": [{"role"')}


@pytest.mark.slow
def test_a_limit_enforced_in_one_second_windows_gives_few_429s_and_uses_most_of_the_limit(tmp_path, server, env_key):
    # 3,000 requests per minute, enforced as 50 a second (the headers describe the minute): a full minute's
    # bucket sent at once would overrun the first second's window. 300 prompts: about 6 s at the limit.
    # The limiter ramps into the bucket the headers show until a 429 with room left says the window is short:
    # that probe costs the request that overran one window and those in flight behind it (50 a second over a
    # round trip of 50 ms and the client's own time: 2 to 5), then none.
    server.config.rpm = 3000
    server.config.rate_quantum_s = 1.0
    server.config.latency_s = 0.05
    total = 300
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", total),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == total
    refused = server.stats.snapshot()["refused_at"]
    assert len(refused) <= 1 + 50 * 0.1, f"one window's overrun and what was in flight behind it: {refused}"
    assert not refused or max(refused) - min(refused) < 1.0, f"all in the one window the probe overran: {refused}"
    elapsed = manifest(run)["this_run"]["elapsed_s"]
    allowed_s = total / 50
    assert elapsed >= allowed_s * 0.9, "the limit was obeyed"
    assert elapsed <= allowed_s / 0.9 + 1, "and mostly used"
    # The overrun's 429s came while everyone waited out the spent window: none of them cut the pace.
    assert manifest(run)["this_run"]["pace_share"] == pytest.approx(0.97), "the pace the run ended at, uncut"


def test_slow_answer_times_out_and_is_retried(tmp_path, server, env_key):
    server.config.faults[1] = "slow"
    server.config.slow_s = 3.0
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 2),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    timeout_s: 0.5\n")
    assert generate(recipe) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 2
    assert manifest(run)["this_run"]["retries"] == 1


def test_budget_without_a_known_price_is_refused(tmp_path, server, env_key, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run",
                          prompts=write_prompts(tmp_path / "p.jsonl", 2), provider="openai",
                          base_url=server.openai_base_url, model="my-own-model", extra="  budget_usd: 1\n")
    assert generate(recipe) == 2
    assert "factory.teacher.price" in capsys.readouterr().err
    assert server.stats.total == 0


@pytest.mark.slow
def test_ctrl_c_finishes_writes_in_flight_and_says_how_to_resume(tmp_path, server, env_key):
    server.config.latency_s = 0.05
    total = 300
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", total),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    max_concurrency: 8\n")
    accepted = run / "accepted.jsonl"
    proc = start_generate(recipe, accepted, 30, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to resume" in err
    assert manifest(run)["status"] == "interrupted"
    kept = read_jsonl(accepted)
    assert 30 <= len(kept) < total
    # every answer received before the stop was written: the cache holds no answer without its record
    with sqlite3.connect(run / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == len(kept)
    server.reset_stats()
    assert generate(recipe) == 0
    assert len(read_jsonl(accepted)) == total and server.stats.total == total - len(kept)
