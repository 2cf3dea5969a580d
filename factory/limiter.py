"""Rate limits, retries and concurrency for one teacher.

- Token buckets for requests and tokens (combined, input and output separately where the provider
  splits them), sized from the recipe's caps and re-sized from every response's headers
  (`x-ratelimit-*`, `anthropic-ratelimit-*`).
- A token reservation is the estimated input plus max_tokens; the unused part is refunded from the
  returned usage, and the chars→tokens estimate calibrates itself from returned usage. A remainder the
  headers report is read less the cost of the other requests in flight: the server had not counted them
  when it answered, and a burst that trusted it would overrun the bucket.
- Concurrency starts small and doubles every round trip (slow start) until it reaches the recipe's
  max_concurrency: the first responses bring the provider's limits before a burst can exceed them.
- Sends spend what the headers say is left, then are paced (factory/pacing.py): while a bucket the headers
  describe holds more than its reserve (2 %), sends ramp into it (the pace over its rate doubles every 2 s),
  so that a bucket that really starts full is spent; below the reserve, sends are evenly spaced at 97 % of
  the limit. Providers may enforce a per-minute limit in windows of a second or two while the headers
  describe the minute (OpenAI and Anthropic both say so): a 429 with room left in the headers while a
  bucket was bursting says so, and that bucket is paced evenly for the rest of the run (and from the first
  request of the next run of the directory: factory/learnt_limits.py), every request
  waiting until the spent window ends (its `retry-after`). A 429 with room left while paced means the pace
  is still too fast for the provider's windows: it cuts the pace by 5 % (answers give it back slowly) and
  retries that request alone.
- A 429 is a limit signal when its headers say the window is spent (a `remaining` of 0) or when 429s come
  together (5 of the last 20 answers): then every request pauses until `retry-after` (or a backoff) has
  passed and concurrency halves, growing back by one per window of successes (AIMD). Any other 429 (a
  lone one) retries that request alone after its `retry-after`: a stray 429 costs one request's wait,
  not the run's.
- 5xx, timeouts and dropped connections back off exponentially with full jitter.
- After `breaker_threshold` consecutive failures the circuit opens: all requests pause for a cooldown,
  then one probe goes through (half-open); a success closes it.
- `share`: this limiter's part of limits several processes spend together (the Ray runner's workers): the
  recipe's caps and the limits and remainders the headers report are scaled by it (`set_share` changes it).
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

from apprentice.errors import ApprenticeError, TeacherError
from apprentice.responses import TeacherResponse, parse_retry_after

from .latency import LatencyGovernor
from .pacing import (BUCKET_OF, HEADER_FAMILIES, Bucket, Pacer, Reservation, amount, header_number, parse_duration,
                     remaining_values)

__all__ = ["Bucket", "Limiter", "LimiterClosed", "LimiterStats", "Reservation", "estimate_tokens", "parse_duration"]


RECENT = 20           # answers remembered to tell a lone 429 from 429s that come together
TOGETHER = 5          # 429s among them that make a limit signal
DEFAULT_CHARS_PER_TOKEN = 4.0  # the input-token estimate before any answer calibrates it
FRAMING_TOKENS = 4    # a request's tokens beyond its messages' characters (roles, separators), in every estimate
MIN_TOKENS_PER_CHAR = 0.01  # a calibration floor: prompts whose framing is most of their tokens


def estimate_tokens(chars: int, tokens_per_char: float = 1.0 / DEFAULT_CHARS_PER_TOKEN) -> int:
    """A request's input tokens from the characters of its messages (a few tokens of message framing added);
    a limiter calibrates `tokens_per_char` from the usage its answers report."""
    return int(chars * tokens_per_char) + FRAMING_TOKENS


class LimiterClosed(ApprenticeError):
    """The run is stopping: this request was not sent."""


@dataclass(slots=True)
class LimiterStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    breaker_opened: int = 0
    waited_s: float = 0.0


class Limiter:
    def __init__(
        self,
        *,
        max_concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        max_retries: int = 8,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        breaker_threshold: int = 8,
        breaker_cooldown_s: float = 5.0,
        chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
        initial_concurrency: int = 8,
        share: float = 1.0,
        follow_latency: bool = False,
    ) -> None:
        self.share = share
        rpm = rpm * share if rpm else rpm
        tpm = tpm * share if tpm else tpm
        self.max_concurrency = max_concurrency
        # A server that queues instead of answering 429: concurrency also follows latency (factory/latency.py).
        self.latency = LatencyGovernor(max_concurrency, initial=initial_concurrency) if follow_latency else None
        self.limit = float(min(max_concurrency, initial_concurrency))  # AIMD window
        self.slow_start = True  # until the first 429: +1 per success, i.e. doubling per round trip
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.buckets: dict[str, Bucket] = {}
        self._caps = {"requests": rpm, "tokens": tpm}
        if rpm:
            self.buckets["requests"] = Bucket(rpm)
        if tpm:
            self.buckets["tokens"] = Bucket(tpm)
        self.max_retries = max_retries
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown_s = breaker_cooldown_s
        self.consecutive_failures = 0
        self.breaker_open = False
        self.pause_until = 0.0
        self._last_decrease = 0.0
        self.tokens_per_char = 1.0 / chars_per_token
        self.stats = LimiterStats()
        self.recent: deque[bool] = deque(maxlen=RECENT)  # was each recent answer a 429?
        self._in_flight_cost: dict[str, float] = {}  # each bucket's cost of the requests in flight
        self.pacer = Pacer()  # when each bucket's next send is due: bursting into a full bucket, or paced
        self._first_send: float | None = None
        self.closed = False
        self._closed_event: asyncio.Event | None = None

    def close(self) -> None:
        """Send nothing more: waiting requests raise LimiterClosed; those in flight finish."""
        self.closed = True
        if self._closed_event is not None:
            self._closed_event.set()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def set_share(self, share: float) -> None:
        """A new part of the shared limits (another worker finished, or one started): the caps, the buckets and
        the pace scale to it. The requests in flight keep their cost: a bucket's level is what is left of this
        worker's part after them, so the part they were taken from (level + their cost) is what scales, and
        their cost is taken from it again. Scaling the level alone would leave a worker whose share doubled
        short by the cost in flight, and one whose share halved that much over."""
        if share == self.share:
            return
        ratio, self.share = share / self.share, share
        now = time.monotonic()
        self._caps = {name: cap * ratio if cap else cap for name, cap in self._caps.items()}
        for name, bucket in self.buckets.items():
            bucket.rescale(ratio, self._in_flight_cost.get(name, 0.0), now)
        self.pacer.rescale(ratio, now)

    def short_windows(self) -> dict[str, float]:
        """The buckets a 429 with room left showed a short window in, with their whole limits (not this
        worker's share): what a resumed run recalls (factory/learnt_limits.py)."""
        return {name: self.buckets[name].capacity / self.share for name in sorted(self.pacer.short)
                if name in self.buckets}

    def recall_short_window(self, name: str, limit: float) -> None:
        """A bucket an earlier run of the directory found enforced in short windows: made now from the limit
        it learnt, and paced evenly from the first request on (the first headers correct it if it changed)."""
        limit *= self.share
        cap = self._caps.get(name)
        if cap is not None:
            limit = min(limit, cap)
        if name not in self.buckets:
            self.buckets[name] = Bucket(limit)
        self.pacer.short.add(name)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the limiter closes."""
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
        try:
            await asyncio.wait_for(self._closed_event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # ---- token estimate -------------------------------------------------------------------------
    def estimate_tokens(self, chars: int) -> int:
        return estimate_tokens(chars, self.tokens_per_char)

    def calibrate(self, chars: int, input_tokens: int) -> None:
        if chars > 0 and input_tokens > 0:
            # The framing is added to every estimate, so it is taken out of what is learnt: learning it into the
            # rate as well overstated each request by the framing (4 tokens of a 20-token request: a token limit
            # paced at 97 % of its reservations was used at 81 %).
            per_char = max(MIN_TOKENS_PER_CHAR, (input_tokens - FRAMING_TOKENS) / chars)
            self.tokens_per_char += 0.1 * (per_char - self.tokens_per_char)

    # ---- concurrency (AIMD) ---------------------------------------------------------------------
    def _window(self) -> int:
        if self.breaker_open:
            return 1
        return max(1, min(int(self.limit), self.latency.limit())) if self.latency else max(1, int(self.limit))

    async def _enter(self) -> None:
        while self.in_flight >= self._window() and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        free = self._window() - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _increase(self) -> None:
        if self.limit < self.max_concurrency:
            step = 1.0 if self.slow_start else 1.0 / self.limit
            self.limit = min(float(self.max_concurrency), self.limit + step)
            self._wake()

    def _decrease(self, now: float) -> None:
        # At most one halving per second: a burst of 429s from one overload counts once.
        self.slow_start = False
        if now - self._last_decrease >= 1.0:
            self.limit = max(1.0, self.limit / 2)
            self._last_decrease = now

    # ---- rate buckets ---------------------------------------------------------------------------
    def _needs(self, reservation: Reservation) -> list[tuple[Bucket, float]]:
        return [(bucket, amount(name, reservation)) for name, bucket in self.buckets.items()]

    async def _admit(self, reservation: Reservation) -> None:
        while not self.closed:
            now = time.monotonic()
            wait = self.pause_until - now
            if wait <= 0:
                needs = self._needs(reservation)
                wait = max((bucket.wait_for(cost, now) for bucket, cost in needs), default=0.0)
                wait = max(wait, self.pacer.wait(self.buckets, now))
                if wait <= 0:
                    for bucket, cost in needs:
                        bucket.take(cost)
                    self.pacer.sent(self.buckets, reservation, now)
                    if self._first_send is None:
                        self._first_send = now
                    return
            self.stats.waited_s += wait
            await self._sleep(wait)

    @property
    def pace_share(self) -> float:
        """The share of each limit a paced bucket is sent at (factory/pacing.py)."""
        return self.pacer.share

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        """Adopt the limits a response reports. A bucket made here starts from the reported remainder
        less what the other requests in flight will take: they were sent before the bucket existed,
        so nothing was taken for them, and the server had not counted them yet when it answered."""
        if not headers:
            return
        others = max(0, self.in_flight - 1)
        for family, (limit_h, remaining_h, reset_h) in HEADER_FAMILIES.items():
            limit = header_number(headers, limit_h)
            remaining = header_number(headers, remaining_h)
            if limit is None and remaining is None:
                continue
            if self.share != 1.0:  # the headers speak for every process that shares the limit
                limit = limit * self.share if limit is not None else None
                remaining = remaining * self.share if remaining is not None else None
            name = BUCKET_OF.get(family, family)
            cap = self._caps.get(name)
            capped = cap is not None and (limit is None or cap < limit)
            if cap is not None and limit is not None:
                limit = min(limit, cap)  # the recipe's cap stays a cap
            if remaining is not None:
                self.pacer.learnt(name, capped, time.monotonic())
            bucket = self.buckets.get(name)
            if bucket is None:
                if limit is None:
                    continue
                bucket = self.buckets[name] = Bucket(limit)
                bucket.observe(limit, remaining, parse_duration(headers.get(reset_h)))
                if reservation is not None:
                    cost = amount(name, reservation)
                    bucket.take(others * cost)
                    self.pacer.start(name, bucket, cost, self.stats.requests, self._since_first())
                continue
            if remaining is not None:
                # The server counted this answer's request and those before it; the others in flight (mostly
                # sent after it) not yet: without this, refunds and stale headers overstate what is left.
                remaining -= self._in_flight_cost.get(name, 0.0)
            bucket.observe(limit, remaining, parse_duration(headers.get(reset_h)))

    def _since_first(self) -> float:
        return time.monotonic() - self._first_send if self._first_send is not None else 0.0

    def _refund(self, reservation: Reservation, response: TeacherResponse) -> None:
        unused_in = max(0.0, reservation.input_tokens - response.input_tokens)
        unused_out = max(0.0, reservation.output_tokens - response.output_tokens)
        for name, unused in (
            ("tokens", unused_in + unused_out),
            ("input_tokens", unused_in),
            ("output_tokens", unused_out),
        ):
            bucket = self.buckets.get(name)
            if bucket is not None and unused:
                bucket.give(unused)

    # ---- one request with retries ---------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.base_backoff_s * (2 ** (attempt - 1))))

    async def run(
        self,
        call: Callable[[], Awaitable[TeacherResponse]],
        *,
        input_tokens: float,
        output_tokens: float,
    ) -> tuple[TeacherResponse, int]:
        """Send with limits and retries; return the response and the number of attempts, or raise
        the last TeacherError (with `attempts` set) when it is not retryable or retries ran out, or
        LimiterClosed when the limiter closed before the request could be sent."""
        reservation = Reservation(float(input_tokens), float(output_tokens))
        attempt = 0
        while True:
            attempt += 1
            await self._enter()
            try:
                await self._admit(reservation)
                if self.closed:
                    raise LimiterClosed()
                self.stats.requests += 1
                ticket = self.latency.sent(self._window()) if self.latency else None
                try:
                    response = await self._in_flight(call, reservation)
                except TeacherError as error:
                    delay = self._on_failure(error, attempt)
                    if delay is None:
                        error.attempts = attempt
                        raise
                else:
                    self._on_success(reservation, response)
                    if ticket is not None:
                        self.latency.answered(ticket, response.output_tokens or 1)
                    return response, attempt
            finally:
                self._leave()
            self.stats.retries += 1
            self.stats.waited_s += delay
            await self._sleep(delay)

    async def _in_flight(self, call: Callable[[], Awaitable[TeacherResponse]],
                         reservation: Reservation) -> TeacherResponse:
        """The call, its cost counted as in flight meanwhile: the headers of other answers do not count it yet."""
        charged = [(name, amount(name, reservation)) for name in self.buckets]
        for name, cost in charged:
            self._in_flight_cost[name] = self._in_flight_cost.get(name, 0.0) + cost
        try:
            return await call()
        finally:
            for name, cost in charged:
                self._in_flight_cost[name] -= cost

    def _on_success(self, reservation: Reservation, response: TeacherResponse) -> None:
        self.observe_headers(response.headers, reservation)
        self._refund(reservation, response)
        self.consecutive_failures = 0
        self.recent.append(False)
        self.pacer.answered()
        if self.breaker_open:
            self.breaker_open = False
            self._wake()  # the window grew back from 1
        self._increase()

    def _limit_signal(self, headers: Mapping[str, str], now: float) -> str:
        """What a 429 speaks for (see the module docstring): "limit" (every request), "short" (a burst
        overran the provider's short window: every request, until it ends) or "lone" (its own request)."""
        remaining = remaining_values(headers)
        if any(value <= 0 for value in remaining):
            return "limit"  # the headers say the window is spent
        if sum(self.recent) >= TOGETHER:
            return "limit"  # 429s come together: whatever the headers say, the limit is reached
        if remaining:  # refused with room left: sent too fast for the provider's short windows
            if self.pacer.short_window(self.buckets, now):
                return "short"
            self.pacer.refused(now)
        return "lone"

    def _on_failure(self, error: TeacherError, attempt: int) -> float | None:
        """Bookkeeping for a failed attempt; the delay before the next, or None to give up."""
        now = time.monotonic()
        self.observe_headers(error.headers, None)
        if not error.retryable:
            return None
        if error.rate_limited:
            self.stats.rate_limited += 1
            self.recent.append(True)
            retry_after = error.retry_after
            if retry_after is None:
                retry_after = parse_retry_after(error.headers)
            delay = retry_after if retry_after is not None else self.backoff(attempt)
            signal = self._limit_signal(error.headers, now)
            if signal != "lone":
                # Everyone waits: the limit (or the provider's short window) is shared, so other requests
                # would hit it too; a short window ends at its retry-after, and the pace holds from then on.
                self.pause_until = max(self.pause_until, now + delay)
            if signal == "limit":
                self._decrease(now)
                # A 429 means the bucket is empty, whatever we thought.
                for name in ("requests",):
                    if name in self.buckets:
                        self.buckets[name].level = min(self.buckets[name].level, 0.0)
            # else: a lone 429 with room left; this request alone waits its retry-after
        else:
            self.stats.server_errors += 1
            self.consecutive_failures += 1
            delay = self.backoff(attempt)
            if self.consecutive_failures >= self.breaker_threshold and not self.breaker_open:
                self.breaker_open = True
                self.stats.breaker_opened += 1
                cooldown = min(self.max_backoff_s, self.breaker_cooldown_s)
                self.pause_until = max(self.pause_until, now + cooldown)
        if attempt > self.max_retries:
            return None
        return delay
