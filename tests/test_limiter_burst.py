"""The limiter against the fake server's rate limits, through the real `openai` SDK: a bucket that starts full is
spent faster than it refills, then paced; a provider that enforces the minute in short windows gets no burst
of 429s. Counts are the server's own (`stats.admitted_at`, `stats.refused_at`: its clock), not client timings."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from helpers import API_KEY, read_jsonl, write_prompts, write_recipe

from factory.__main__ import main
from apprentice.errors import TeacherError
from factory.learnt_limits import LIMITS, PAUSES, exchange, exchange_pauses, limiter_key, read_limits
from factory.limiter import Limiter
from factory.recipe import TeacherConfig, load_factory_config
from factory.teachers import make_teacher
from fakes import FakeConfig, FakeServer

MAX_TOKENS = 16


def ask_all(server: FakeServer, limiter: Limiter, count: int, monkeypatch) -> list[str]:
    """Send `count` distinct requests through the limiter with the SDK teacher; their answers' texts."""
    monkeypatch.setenv("APPRENTICE_TEST_KEY", API_KEY)
    teacher = make_teacher(TeacherConfig(provider="openai", model="gpt-4o-mini", base_url=server.openai_base_url,
                                         api_key_env="APPRENTICE_TEST_KEY", client="sdk",
                                         params={"temperature": 0.8, "max_tokens": MAX_TOKENS}))

    async def one(i: int) -> str:
        body = teacher.build_request([{"role": "user", "content": f"question number {i}"}], 1)
        response, _ = await limiter.run(lambda: teacher.complete(body), input_tokens=10, output_tokens=MAX_TOKENS)
        return response.choices[0].text

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(one(i) for i in range(count)))
        finally:
            await teacher.aclose()

    return asyncio.run(main())


def per_window(stamps: list[float], window_s: float) -> Counter:
    return Counter(int(stamp // window_s) for stamp in stamps)


@pytest.mark.slow
def test_a_full_bucket_is_spent_faster_than_it_refills_then_paced_without_429s(monkeypatch):
    # 600 a minute (10 a second), a token bucket that starts full, as the headers say; 760 requests: the
    # bucket's 600, what refills while it is spent, and then some that must wait for the refill.
    with FakeServer(FakeConfig(api_key=API_KEY, latency_s=0.005, rpm=600)) as server:
        limiter = Limiter(max_concurrency=32, initial_concurrency=8)
        answers = ask_all(server, limiter, 760, monkeypatch)
        stats = server.stats.snapshot()
    assert len(answers) == 760 and all(answers), "every request answered"
    assert len(stats["refused_at"]) <= 7, f"under 1 % 429s: {len(stats['refused_at'])}"
    admitted = sorted(stats["admitted_at"])
    first_12_s = sum(1 for stamp in admitted if stamp < admitted[0] + 12.0)
    paced = 8 + 12 * 9.7  # what sends paced at the rate from the first headers on would have had admitted
    assert first_12_s >= 3 * paced, f"the full bucket is spent in the first 12 s: {first_12_s} admitted"
    tail = admitted[-31:]
    assert tail[-1] - tail[0] >= 30 / 10.5, f"once spent, the last 30 keep to the refill: {tail[-1] - tail[0]:.2f} s"
    assert limiter.pacer.short == set(), "no 429 with room left: the bucket stayed a bucket"


def test_a_provider_that_enforces_the_minute_in_short_windows_gets_no_burst_of_429s(monkeypatch):
    # 1,200 a minute, also enforced in fixed windows of 0.5 s (10 a window); the headers describe the minute.
    with FakeServer(FakeConfig(api_key=API_KEY, latency_s=0.01, rpm=1200, rate_quantum_s=0.5)) as server:
        limiter = Limiter(max_concurrency=32, initial_concurrency=8)
        answers = ask_all(server, limiter, 60, monkeypatch)
        stats = server.stats.snapshot()
    assert len(answers) == 60 and all(answers), "every request answered"
    refused = stats["refused_at"]
    assert len(refused) <= 3, f"the burst's probe costs a 429 or two, not a window's worth: {refused}"
    assert len(refused) >= 1 and limiter.pacer.short == {"requests"}, "the overrun window was seen and remembered"
    windows = per_window(stats["admitted_at"], 0.5)
    assert max(windows.values()) <= 10, f"no window over its share: {windows}"
    assert max(refused) < min(refused) + 1.0, "the 429s all came from the first overrun, none after it"


def _generate(recipe, limit: int | None = None) -> int:
    return main(["generate", str(recipe), *(["--limit", str(limit)] if limit else [])])


def test_a_short_window_learnt_by_a_run_is_paced_from_the_first_request_when_it_resumes(tmp_path, env_key):
    # The same short windows as above (1,200 a minute, 10 per 0.5 s). The first run learns them with a 429 or
    # two; the run again, with more prompts, recalls them from limits.json and sends no burst at all.
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 80)
    with FakeServer(FakeConfig(api_key=API_KEY, latency_s=0.01, rpm=1200, rate_quantum_s=0.5)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                              base_url=server.openai_base_url, extra="  checks: [empty]\n")
        assert _generate(recipe, limit=40) == 0
        first = server.stats.snapshot()
        assert len(first["refused_at"]) >= 1, "the first run must overrun a short window to learn it"
        learnt = json.loads((run / LIMITS).read_text())
        assert learnt["limiters"][limiter_key(load_factory_config(recipe).teacher)] == {
            "short_windows": {"requests": 1200.0}}, learnt
        assert _generate(recipe) == 0
        second = server.stats.snapshot()
    assert len(read_jsonl(run / "accepted.jsonl")) == 80, "every prompt once"
    assert len(second["admitted_at"]) - len(first["admitted_at"]) == 40, "the resumed run paid only the new prompts"
    assert second["refused_at"] == first["refused_at"], "no 429 in the resumed run: paced from its first request"
    resumed = [stamp for stamp in second["admitted_at"] if stamp not in set(first["admitted_at"])]
    assert max(per_window(resumed, 0.5).values()) <= 10, "no window over its share"


def test_an_unreadable_limits_file_is_ignored_with_a_warning_that_names_it(tmp_path, env_key, capsys):
    assert read_limits(tmp_path) == ({}, None), "no file: nothing learnt, nothing to say"
    for text, why in (('{"version": 1, "limiters": {"k": {"short_windows": ', "JSONDecodeError"),
                      ('{"version": 1, "limiters": {"k": {"requests": 1200}}}', "not the limits this run writes"),
                      ('{"version": 7, "limiters": {}}', "version 7")):
        (tmp_path / LIMITS).write_text(text)
        learnt, warning = read_limits(tmp_path)
        assert learnt == {} and warning is not None
        assert str(tmp_path / LIMITS) in warning and why in warning, warning
    with FakeServer(FakeConfig(api_key=API_KEY)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path, prompts=write_prompts(tmp_path / "p.jsonl", 3),
                              provider="openai", base_url=server.openai_base_url)
        assert _generate(recipe) == 0, "the run goes on"
    shown = capsys.readouterr()
    assert f"{LIMITS} cannot be read" in shown.out + shown.err


def test_a_short_window_one_worker_learns_is_paced_by_the_others_through_the_shared_folder(tmp_path):
    # The Ray runner's workers exchange what they learnt through shards/limits.json every 0.1 s.
    key = "openai http://127.0.0.1:1/v1 gpt-4o-mini"
    room = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "590"}
    learner, other = Limiter(max_concurrency=8, share=0.5), Limiter(max_concurrency=8, share=0.5)
    for limiter in (learner, other):
        limiter.observe_headers(room)
    assert exchange(tmp_path, {key: learner}) == 0 and not (tmp_path / LIMITS).exists(), "nothing learnt yet"
    learner._on_failure(TeacherError("429", retryable=True, status=429, retry_after=0.0, rate_limited=True,
                                     headers=room), 1)
    assert learner.pacer.short == {"requests"}
    assert exchange(tmp_path, {key: learner}) == 0, "its own window is not new to it"
    assert read_limits(tmp_path)[0] == {key: {"requests": 600.0}}, "the whole limit, not the worker's share"
    assert exchange(tmp_path, {key: other}) == 1 and other.pacer.short == {"requests"}
    assert other.buckets["requests"].capacity == 300.0, "taken at the other worker's share"
    assert exchange(tmp_path, {key: other}) == 0, "once"
    (tmp_path / LIMITS).write_text("{not json", encoding="utf-8")
    assert exchange(tmp_path, {key: other}) == 0 and read_limits(tmp_path)[0] == {key: {"requests": 600.0}}, \
        "an unreadable file is replaced by what the worker knows"


def test_a_pause_one_worker_enters_holds_the_others_until_the_same_moment(tmp_path):
    # A spent window found by one Ray worker: the others stop sending into it too (shards/pauses.json).
    key = "openai http://127.0.0.1:1/v1 gpt-4o-mini"
    refused, other = Limiter(max_concurrency=8, share=0.5), Limiter(max_concurrency=8, share=0.5)
    assert exchange_pauses(tmp_path, {key: refused}) == 0 and not (tmp_path / PAUSES).exists(), "no pause yet"
    refused._on_failure(TeacherError("429", retryable=True, status=429, retry_after=1.5, rate_limited=True,
                                     headers={"x-ratelimit-limit-requests": "600",
                                              "x-ratelimit-remaining-requests": "0"}), 1)
    assert refused.pause_until > time.monotonic() + 1.0, "a spent window pauses its own worker"
    assert exchange_pauses(tmp_path, {key: refused}) == 0, "its own pause is not new to it"
    assert exchange_pauses(tmp_path, {key: other}) == 1
    assert other.pause_until == pytest.approx(refused.pause_until, abs=0.05), "until the same moment"
    assert exchange_pauses(tmp_path, {"another endpoint": Limiter(max_concurrency=8)}) == 0, "per endpoint"
    (tmp_path / PAUSES).write_text("[1, 2", encoding="utf-8")
    assert exchange_pauses(tmp_path, {key: other}) == 0 and key in json.loads((tmp_path / PAUSES).read_text()), \
        "an unreadable file is replaced by what the worker knows"
