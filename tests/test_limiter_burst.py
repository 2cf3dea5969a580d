"""The limiter against the fake server's rate limits, through the real `openai` SDK: a bucket that starts full is
spent faster than it refills, then paced; a provider that enforces the minute in short windows gets no burst
of 429s. Counts are the server's own (`stats.admitted_at`, `stats.refused_at`: its clock), not client timings."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from conftest import API_KEY

from factory.limiter import Limiter
from factory.recipe import TeacherConfig
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
