"""Concurrency that follows latency, for servers that queue instead of answering 429 (vLLM, SGLang, TGI).

A hosted API says "too many" with a 429 and its headers; a self-hosted server takes every request and queues
what it cannot batch, so sending more only makes each answer wait longer. The limiter's slow start would then
grow to `max_concurrency` (hundreds) and every request would sit in the server's queue: no more throughput,
answers seconds late, and a run that is stopped or crashes has all of those in flight.

The governor watches windows of answers: for each, the concurrency in effect, the throughput (output tokens,
or answers, per second) and the 95th-percentile latency. Among the recent windows it keeps the knee: the
lowest concurrency that reached within `KNEE_SHARE` of the best throughput seen. A window that ran with more
concurrency than the knee, got no more than `GAIN` times the knee's throughput and paid more than `RISE` times
its p95 latency bought latency, not throughput: the cap goes back to the knee and holds for a few windows.
Otherwise, when the cap binds, it probes upwards: doubling each window until the first cut (the slow start,
measured in windows rather than answers, so that a queue is seen before it is filled), then by an eighth. A
server that batches better with more requests (throughput rising with concurrency) is followed up to
`max_concurrency`, the ceiling.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

WINDOW = 24        # answers per measurement window
RISE = 1.3         # p95 latency over the knee's that counts as "latency climbed"
GAIN = 1.1         # throughput over the knee's that counts as "throughput grew"
KNEE_SHARE = 0.9   # a window within this share of the best throughput is on the plateau
SPAN = 5           # a window lasts at least this many of the quickest round trips
HOLD = 4           # windows the cap holds after a cut before probing again
HISTORY = 12       # windows remembered (older ones age out, so a change in the server's load is followed)


@dataclass(frozen=True)
class Window:
    level: float        # mean concurrency allowed (the limiter's window) when its answers were sent
    throughput: float   # output tokens (or answers) per second
    p95_s: float


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class LatencyGovernor:
    def __init__(self, ceiling: int, *, initial: int = 8, window: int = WINDOW) -> None:
        self.ceiling = ceiling
        self.cap = float(min(ceiling, initial))
        self._doubling = True  # until the first cut, each window that binds doubles the cap (slow start)
        self.window = window
        self.history: deque[Window] = deque(maxlen=HISTORY)
        self._latencies: list[float] = []
        self._levels: list[float] = []
        self._work = 0.0
        self._fastest = math.inf  # the quickest answer yet: the server's round trip without a queue
        self._started: float | None = None
        self._hold = 0
        self._settling = False  # the window after a cut still carries the queue it cut: not measured
        self.cuts = 0
        self.probes = 0

    def limit(self) -> int:
        return max(1, int(self.cap))

    def sent(self, level: float) -> tuple[float, float]:
        """A request left under `level` (the concurrency allowed): the first of a window starts its clock. The
        ticket it returns goes back with the answer."""
        now = time.monotonic()
        if self._started is None:
            self._started = now
        return now, level

    def answered(self, ticket: tuple[float, float], work: float) -> None:
        """The answer to the request `ticket` came back, carrying `work` (output tokens, or 1)."""
        now = time.monotonic()
        sent, level = ticket
        latency_s = now - sent
        self._latencies.append(latency_s)
        self._fastest = min(self._fastest, latency_s)
        self._levels.append(level)
        self._work += max(work, 1.0)
        if len(self._latencies) < self.window or self._started is None:
            return
        elapsed = max(now - self._started, 1e-6)
        if elapsed < SPAN * self._fastest:
            return  # a few round trips at least, or answers that come in rounds make the throughput jump
        current = Window(sum(self._levels) / len(self._levels), self._work / elapsed, p95(self._latencies))
        self._latencies, self._levels, self._work, self._started = [], [], 0.0, now
        if self._settling:
            self._settling = False
            return
        self._decide(current)

    def knee(self) -> Window | None:
        if not self.history:
            return None
        best = max(window.throughput for window in self.history)
        return min((w for w in self.history if w.throughput >= KNEE_SHARE * best), key=lambda w: w.level)

    def _decide(self, current: Window) -> None:
        knee = self.knee()
        self.history.append(current)
        if (knee is not None and current.level > knee.level * 1.05 and current.throughput < knee.throughput * GAIN
                and current.p95_s > knee.p95_s * RISE):
            # Back to the most concurrency that still had the knee's latency and throughput.
            best = max(window.throughput for window in self.history)
            good = [w.level for w in self.history
                    if w.p95_s <= knee.p95_s * RISE and w.throughput >= KNEE_SHARE * best and w.level < current.level]
            self.cap = max(1.0, max(good, default=knee.level))
            self._doubling = False
            self._hold = HOLD
            self._settling = True
            self.cuts += 1
            return
        if self._hold:
            self._hold -= 1
        elif self.cap < self.ceiling and current.level >= 0.9 * self.cap:
            step = self.cap if self._doubling else max(1.0, self.cap / 8)
            self.cap = min(float(self.ceiling), self.cap + step)
            self.probes += 1
