"""Rate limits, retries and concurrency for one teacher.

- Token buckets for requests and tokens (combined, input and output separately where the provider
  splits them), sized from the recipe's caps and re-sized from every response's headers
  (`x-ratelimit-*`, `anthropic-ratelimit-*`).
- A token reservation is the estimated input plus max_tokens; the unused part is refunded from the
  returned usage, and the chars→tokens estimate calibrates itself from returned usage.
- Concurrency starts small and doubles every round trip (slow start) until it reaches the recipe's
  max_concurrency: the first responses bring the provider's limits before a burst can exceed them.
- Sends are paced: evenly spaced at 97 % of each limit (costs counted as reserved, never refunded). The
  providers may enforce a per-minute limit in windows of a second or two while the headers describe the
  minute (OpenAI and Anthropic both say so), and a minute's worth sent at once overruns such a window: a
  bucket that starts full is only used as fast as the limit refills. A 429 with room left in the headers
  means the pace is still too fast for the provider's windows: it cuts the pace by 5 % (answers give it
  back slowly) and retries that request alone.
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
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Awaitable, Callable, Mapping

from apprentice.errors import ApprenticeError, TeacherError
from apprentice.responses import TeacherResponse, parse_retry_after

from .latency import LatencyGovernor


PACE_SHARE = 0.97     # paced, each bucket is sent at most this share of its limit, evenly spaced
PACE_GAIN = 0.0001    # what each answer gives back to the paced share after a cut
RECENT = 20           # answers remembered to tell a lone 429 from 429s that come together
TOGETHER = 5          # 429s among them that make a limit signal
DEFAULT_CHARS_PER_TOKEN = 4.0  # the input-token estimate before any answer calibrates it


def estimate_tokens(chars: int, tokens_per_char: float = 1.0 / DEFAULT_CHARS_PER_TOKEN) -> int:
    """A request's input tokens from the characters of its messages (a few tokens of message framing added);
    a limiter calibrates `tokens_per_char` from the usage its answers report."""
    return int(chars * tokens_per_char) + 4


class LimiterClosed(ApprenticeError):
    """The run is stopping: this request was not sent."""


class Bucket:
    """Leaky token bucket: `capacity` per `window` seconds, refilled continuously."""

    def __init__(self, capacity: float, window: float = 60.0) -> None:
        self.capacity = capacity
        self.rate = capacity / window
        self.level = capacity
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        self._refill(now)
        amount = min(amount, self.capacity)
        if self.level >= amount:
            return 0.0
        return (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.capacity)

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def observe(self, limit: float | None, remaining: float | None, reset_s: float | None) -> None:
        """Adopt the server's view: its limit, and never more left than it says remain."""
        if limit is not None and limit > 0 and limit != self.capacity:
            self.capacity = limit
            window = 60.0
            self.rate = limit / window
            self.level = min(self.level, limit)
        if remaining is not None:
            self.level = min(self.level, remaining)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | None) -> float | None:
    """OpenAI's reset format ('1s', '6m0s', '120ms', '1h2m3.5s') or an RFC 3339 time (Anthropic)."""
    if not value:
        return None
    parts = _DURATION.findall(value)
    if parts and "".join(a + b for a, b in parts) == value.strip():
        return sum(float(num) * _UNITS[unit] for num, unit in parts)
    try:
        return max(0.0, datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - time.time())
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _anthropic(kind: str) -> tuple[str, str, str]:
    name = f"anthropic-ratelimit-{kind}"
    return f"{name}-limit", f"{name}-remaining", f"{name}-reset"


# bucket name → (limit header, remaining header, reset header), for each provider's header family
HEADER_FAMILIES: dict[str, tuple[str, str, str]] = {
    "requests": ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    "tokens": ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    "a_requests": _anthropic("requests"),
    "a_tokens": _anthropic("tokens"),
    "input_tokens": _anthropic("input-tokens"),
    "output_tokens": _anthropic("output-tokens"),
}
# Anthropic's request and combined-token families feed the same buckets as OpenAI's.
_BUCKET_OF = {"a_requests": "requests", "a_tokens": "tokens"}
BUCKETS = ("requests", "tokens", "input_tokens", "output_tokens")


@dataclass(slots=True)
class Reservation:
    input_tokens: float
    output_tokens: float


def _amount(bucket: str, reservation: Reservation) -> float:
    if bucket == "requests":
        return 1.0
    if bucket == "input_tokens":
        return reservation.input_tokens
    if bucket == "output_tokens":
        return reservation.output_tokens
    return reservation.input_tokens + reservation.output_tokens


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
        self.pace_share = PACE_SHARE
        self._due: dict[str, float] = {}  # paced: when each bucket's next send is due
        self._last_pace_cut = 0.0
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
        """A new part of the shared limits (another worker finished): the caps and buckets scale to it."""
        ratio, self.share = share / self.share, share
        self._caps = {name: cap * ratio if cap else cap for name, cap in self._caps.items()}
        for bucket in self.buckets.values():
            bucket.capacity, bucket.rate, bucket.level = (value * ratio for value in (bucket.capacity, bucket.rate,
                                                                                   bucket.level))

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
            self.tokens_per_char += 0.1 * (input_tokens / chars - self.tokens_per_char)

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
        return [(bucket, _amount(name, reservation)) for name, bucket in self.buckets.items()]

    async def _admit(self, reservation: Reservation) -> None:
        while not self.closed:
            now = time.monotonic()
            wait = self.pause_until - now
            if wait <= 0:
                needs = self._needs(reservation)
                wait = max((bucket.wait_for(amount, now) for bucket, amount in needs), default=0.0)
                wait = max(wait, self._pace_wait(reservation, now))
                if wait <= 0:
                    for bucket, amount in needs:
                        bucket.take(amount)
                    self._record_send(reservation, now)
                    if self._first_send is None:
                        self._first_send = now
                    return
            self.stats.waited_s += wait
            await self._sleep(wait)

    # ---- pacing: sends spaced evenly, so that no short window at the server is overrun -----------------
    def _pace_wait(self, reservation: Reservation, now: float) -> float:
        """Seconds until this send keeps to the paced rate of every bucket (`_paced_at`)."""
        return max((self._due.get(name, 0.0) - now for name in self.buckets), default=0.0)

    def _record_send(self, reservation: Reservation, now: float) -> None:
        """The next send of each bucket is due once this one's cost has flowed at the paced rate."""
        for name, bucket in self.buckets.items():
            rate = bucket.rate * self.pace_share
            self._due[name] = max(self._due.get(name, now), now) + _amount(name, reservation) / rate

    def _paced_at(self, now: float, refused: bool) -> None:
        """The paced rate, as a share of each limit: PACE_SHARE to start; a 429 with room left cuts it by 5 %
        (at most once a second: a window's worth of 429s is one overrun); each answer gives a little back.
        Whole requests per window cap what can be used (a window of 666 tokens holds 9 requests of 69)."""
        if refused:
            if now - self._last_pace_cut >= 1.0:
                self.pace_share = max(0.5, self.pace_share * 0.95)
                self._last_pace_cut = now
        else:
            self.pace_share = min(PACE_SHARE, self.pace_share + PACE_GAIN)

    def observe_headers(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        """Adopt the limits a response reports. A bucket made here starts from the reported remainder
        less what the other requests in flight will take: they were sent before the bucket existed,
        so nothing was taken for them, and the server had not counted them yet when it answered."""
        if not headers:
            return
        others = max(0, self.in_flight - 1)
        for family, (limit_h, remaining_h, reset_h) in HEADER_FAMILIES.items():
            limit = _number(headers, limit_h)
            remaining = _number(headers, remaining_h)
            if limit is None and remaining is None:
                continue
            if self.share != 1.0:  # the headers speak for every process that shares the limit
                limit = limit * self.share if limit is not None else None
                remaining = remaining * self.share if remaining is not None else None
            name = _BUCKET_OF.get(family, family)
            cap = self._caps.get(name)
            if cap is not None and limit is not None:
                limit = min(limit, cap)  # the recipe's cap stays a cap
            bucket = self.buckets.get(name)
            if bucket is None:
                if limit is None:
                    continue
                bucket = self.buckets[name] = Bucket(limit)
                bucket.observe(limit, remaining, parse_duration(headers.get(reset_h)))
                if reservation is not None:
                    bucket.take(others * _amount(name, reservation))
                    # Pacing starts as if the requests sent before the limit was known had been paced.
                    sent = (self.stats.requests * _amount(name, reservation)) / (bucket.rate * self.pace_share)
                    self._due[name] = time.monotonic() + max(0.0, sent - self._since_first())
                continue
            bucket.observe(limit, remaining, parse_duration(headers.get(reset_h)))

    def _since_first(self) -> float:
        return time.monotonic() - self._first_send if self._first_send is not None else 0.0

    def _refund(self, reservation: Reservation, response: TeacherResponse) -> None:
        unused_in = max(0.0, reservation.input_tokens - response.input_tokens)
        unused_out = max(0.0, reservation.output_tokens - response.output_tokens)
        for name, amount in (
            ("tokens", unused_in + unused_out),
            ("input_tokens", unused_in),
            ("output_tokens", unused_out),
        ):
            bucket = self.buckets.get(name)
            if bucket is not None and amount:
                bucket.give(amount)

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
                    response = await call()
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

    def _on_success(self, reservation: Reservation, response: TeacherResponse) -> None:
        self.observe_headers(response.headers, reservation)
        self._refund(reservation, response)
        self.consecutive_failures = 0
        self.recent.append(False)
        if self.pace_share < PACE_SHARE:
            self._paced_at(time.monotonic(), refused=False)
        if self.breaker_open:
            self.breaker_open = False
            self._wake()  # the window grew back from 1
        self._increase()

    def _limit_signal(self, headers: Mapping[str, str]) -> bool:
        """Whether a 429 speaks for every request (see the module docstring), not just its own."""
        remaining = [value for _, remaining_h, _ in HEADER_FAMILIES.values()
                     if (value := _number(headers, remaining_h)) is not None]
        if any(value <= 0 for value in remaining):
            return True  # the headers say the window is spent
        if sum(self.recent) >= TOGETHER:
            return True  # 429s come together: whatever the headers say, the limit is reached
        if remaining:  # refused with room left: the pace is too fast for the provider's short windows
            self._paced_at(time.monotonic(), refused=True)
        return False

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
            if self._limit_signal(error.headers):
                self._decrease(now)
                # Everyone waits: the limit is shared, so other requests would hit it too.
                self.pause_until = max(self.pause_until, now + delay)
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
