"""The limiter's rate buckets, the providers' rate-limit headers, and when each bucket's next send is due.

A provider's headers (`x-ratelimit-*`, `anthropic-ratelimit-*`) describe a per-minute limit and what remains
of it. Two kinds of provider send the same headers and differ in what they admit:
- a token bucket that really starts full: the whole `remaining` may be spent at once, and a client that
  sends only as fast as the limit refills wastes it (benchmarks/results/peers.md: 60 % of the limit used);
- a per-minute limit enforced in windows of a second or two (OpenAI and Anthropic both say they may do so):
  a minute's worth sent at once overruns such a window, and only an even pace avoids 429s
  (benchmarks/results/limits.md).

Only a send tells them apart, so the `Pacer` starts every bucket the headers describe as a bucket that may
be spent, but ramps into it: the pace over the limit's rate doubles every `RAMP_DOUBLING_S` while the bucket
holds more than `RESERVE_SHARE` of its capacity, so that a short window is overrun by a request or two, not
by a round trip of full concurrency. A 429 whose headers still show room while a bucket was bursting means
the provider enforces a shorter window: those buckets are paced evenly for the rest of the run (`short`).
A paced bucket is sent at `share` (97 %) of its rate; one whose reserve is reached too, so that a bucket
spent to its reserve is used as fast as it refills and no faster. A bucket whose size is the recipe's cap
(below the provider's limit) is always paced: the cap is the rate the user asked for.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Mapping

PACE_SHARE = 0.97     # paced, each bucket is sent at most this share of its limit, evenly spaced
PACE_GAIN = 0.0001    # what each answer gives back to the paced share after a cut
RESERVE_SHARE = 0.02  # a bucket bursts only while more than this share of its capacity is left
RAMP_DOUBLING_S = 2.0  # a bursting bucket's pace over its rate doubles this often (a short window's probe)
MAX_BOOST = 10_000.0  # past this the pace no longer binds: concurrency and the bucket's level do


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

    def rescale(self, ratio: float, in_flight: float, now: float) -> None:
        """This bucket as `ratio` times its part of a shared limit. `in_flight`: the cost of the requests sent
        from it and not answered yet (taken from the level, and still owed whatever the share)."""
        self._refill(now)  # the time before the change refills at the old rate
        self.capacity *= ratio
        self.rate *= ratio
        self.level = min(self.capacity, (self.level + in_flight) * ratio - in_flight)

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


def header_number(headers: Mapping[str, str], name: str) -> float | None:
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
BUCKET_OF = {"a_requests": "requests", "a_tokens": "tokens"}
BUCKETS = ("requests", "tokens", "input_tokens", "output_tokens")


def remaining_values(headers: Mapping[str, str]) -> list[float]:
    """Every `remaining` the headers report, whichever family."""
    return [value for _, remaining_h, _ in HEADER_FAMILIES.values()
            if (value := header_number(headers, remaining_h)) is not None]


@dataclass(slots=True)
class Reservation:
    input_tokens: float
    output_tokens: float


def amount(bucket: str, reservation: Reservation) -> float:
    if bucket == "requests":
        return 1.0
    if bucket == "input_tokens":
        return reservation.input_tokens
    if bucket == "output_tokens":
        return reservation.output_tokens
    return reservation.input_tokens + reservation.output_tokens


class Pacer:
    """When each bucket's next send is due (see the module docstring)."""

    def __init__(self) -> None:
        self.share = PACE_SHARE
        self.due: dict[str, float] = {}          # when each bucket's next send is due
        self.ramp_start: dict[str, float] = {}   # buckets the headers showed room in, and since when
        self.paced: set[str] = set()             # buckets that never burst: the recipe's cap binds
        self.short: set[str] = set()             # buckets a 429 with room left showed a short window in
        self.ramp_delay_s = 0.0  # how long a bucket is paced before it ramps (Ray's workers ramp in turn)
        self._last_cut = 0.0

    def learnt(self, name: str, capped: bool, now: float) -> None:
        """The headers reported this bucket's remainder; `capped`: the recipe's cap is below their limit."""
        if capped:
            self.paced.add(name)
        elif name not in self.ramp_start:
            self.ramp_start[name] = now + self.ramp_delay_s

    def bursting(self, name: str, bucket: Bucket) -> bool:
        """Whether this bucket may be spent faster than it refills: the headers showed room, no short window
        was seen, the recipe's cap does not bind, and more than its reserve is left."""
        return (name in self.ramp_start and name not in self.short and name not in self.paced
                and bucket.level > bucket.capacity * RESERVE_SHARE)

    def wait(self, names: Iterable[str], now: float) -> float:
        """Seconds until a send keeps to the pace of every bucket."""
        return max((self.due.get(name, 0.0) - now for name in names), default=0.0)

    def sent(self, buckets: Mapping[str, Bucket], reservation: Reservation, now: float) -> None:
        """The next send of each bucket is due once this one's cost has flowed at its pace (taken already)."""
        for name, bucket in buckets.items():
            rate = bucket.rate * self.share
            if self.bursting(name, bucket) and now > self.ramp_start[name]:
                rate *= min(MAX_BOOST, 2.0 ** ((now - self.ramp_start[name]) / RAMP_DOUBLING_S))
            spacing = amount(name, reservation) / rate
            # From when this send was due, not from now: a send the event loop woke a little late for would
            # otherwise push every later one back, and the lateness would add up (a 2 s window got 95 % of
            # its share at a pace of 97 %). A bucket idle for longer gets at most one send's catch-up.
            self.due[name] = max(self.due.get(name, now), now - spacing) + spacing

    def start(self, name: str, bucket: Bucket, cost: float, sent_before: int, since_first: float) -> None:
        """A bucket made from the first headers: pacing starts as if the `sent_before` requests sent before
        the limit was known had been paced."""
        sent = sent_before * cost / (bucket.rate * self.share)
        self.due[name] = time.monotonic() + max(0.0, sent - since_first)

    def rescale(self, ratio: float, now: float) -> None:
        """The buckets' rates scaled by `ratio` (a new share of a shared limit): a send not yet due waits what
        is left of its spacing at the new rate."""
        for name, due in self.due.items():
            if due > now:
                self.due[name] = now + (due - now) / ratio

    def short_window(self, buckets: Mapping[str, Bucket], now: float) -> bool:
        """A 429 with room left in the headers: the buckets that were bursting are paced from now on (the
        provider enforces a shorter window than the minute). Whether any was bursting."""
        found = [name for name, bucket in buckets.items() if self.bursting(name, bucket)]
        for name in found:
            self.short.add(name)
            self.due[name] = now  # from now on, evenly spaced (not the burst's spacing)
        if found:
            self._last_cut = now  # the burst's other 429s, already on their way, are no sign of a fast pace
        return bool(found)

    def refused(self, now: float) -> None:
        """A 429 with room left while paced: the pace is still too fast for the provider's windows; cut
        it by 5 % (at most once a second: a window's worth of 429s is one overrun)."""
        if now - self._last_cut >= 1.0:
            self.share = max(0.5, self.share * 0.95)
            self._last_cut = now

    def answered(self) -> None:
        """Each answer gives a little of a cut back. Whole requests per window cap what can be used (a
        window of 666 tokens holds 9 requests of 69)."""
        if self.share < PACE_SHARE:
            self.share = min(PACE_SHARE, self.share + PACE_GAIN)
