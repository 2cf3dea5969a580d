"""What the router counts, the alarm it rings, and `/metrics` in the Prometheus text format (version 0.0.4).

Counters and histograms are plain numbers kept on the event loop (one thread: no locks). The rolling figures
are the last `alarm.window` shadow comparisons, student confidences and shadow judge preferences (1 the judge
preferred the student's answer, 0.5 a tie, 0 the teacher's); the alarm is on while one of them, over at least
`alarm.min_samples` values, is below its floor.
"""
from __future__ import annotations

import bisect
from collections import Counter, deque
from typing import Callable

from .config import AlarmConfig

# Seconds; a backend's answer from a fast fake (under a millisecond) to a local model's long answer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "apprentice_serve"


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class Metrics:
    def __init__(self, alarm: AlarmConfig, on_alarm: Callable[[str, str, bool], None] | None = None) -> None:
        self.alarm = alarm
        self.on_alarm = on_alarm  # (kind, reason, on): told when an alarm starts (True) or ends (False)
        self.requests: Counter = Counter()   # (answered_by, route) → answered requests
        self.errors: Counter = Counter()     # HTTP status → error responses
        self.fallbacks: Counter = Counter()  # reason → answers served by the other model, or marked
        self.latency: dict[str, Histogram] = {"student": Histogram(), "teacher": Histogram()}
        self.backend_errors: Counter = Counter()  # backend → failed asks
        self.shadows = 0
        self.agreement: deque[bool] = deque(maxlen=alarm.window)
        self.confidence: deque[float] = deque(maxlen=alarm.window)
        self.preference: deque[float] = deque(maxlen=alarm.window)
        self.judge_outcomes: Counter = Counter()  # judged | unparsed | error | budget_spent → shadow comparisons
        self.judge_cost_usd = 0.0
        self.judge_spent = False
        self.alarms: dict[str, str] = {}  # kind → the reason, while on

    # ---- counting ------------------------------------------------------------------------------------------
    def answered(self, answered_by: str, route: str) -> None:
        self.requests[(answered_by, route)] += 1

    def error(self, status: int) -> None:
        self.errors[status] += 1

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def backend(self, name: str, seconds: float, ok: bool) -> None:
        self.latency[name].observe(seconds)
        if not ok:
            self.backend_errors[name] += 1

    def student_confidence(self, value: float | None) -> None:
        if value is not None:
            self.confidence.append(value)
            self._check()

    def shadow(self, agree: bool) -> None:
        self.shadows += 1
        self.agreement.append(agree)
        self._check()

    def judged(self, preference: float | None, cost_usd: float) -> None:
        """A shadow pair judged: its preference for the student (None: a verdict the parser could not read)."""
        self.judge_cost_usd += cost_usd
        if preference is None:
            self.judge_outcomes["unparsed"] += 1
            return
        self.judge_outcomes["judged"] += 1
        self.preference.append(preference)
        self._check()

    def judge_failed(self) -> None:
        self.judge_outcomes["error"] += 1

    def judge_skipped(self) -> None:
        """A shadow pair compared by agreement only: the judge's budget is spent."""
        self.judge_spent = True
        self.judge_outcomes["budget_spent"] += 1

    # ---- the alarm -----------------------------------------------------------------------------------------
    def rolling_agreement(self) -> float | None:
        return sum(self.agreement) / len(self.agreement) if self.agreement else None

    def rolling_confidence(self) -> float | None:
        return sum(self.confidence) / len(self.confidence) if self.confidence else None

    def rolling_preference(self) -> float | None:
        return sum(self.preference) / len(self.preference) if self.preference else None

    def _check(self) -> None:
        floors = (("agreement", self.alarm.agreement_floor, self.agreement, self.rolling_agreement()),
                  ("confidence", self.alarm.confidence_floor, self.confidence, self.rolling_confidence()),
                  ("judge", self.alarm.judge_floor, self.preference, self.rolling_preference()))
        for kind, floor, values, value in floors:
            on = floor is not None and value is not None and len(values) >= self.alarm.min_samples and value < floor
            if on and kind not in self.alarms:
                self.alarms[kind] = (f"rolling {kind} {value:.3f} is below the floor {floor} "
                                     f"(last {len(values)} values)")
                if self.on_alarm is not None:
                    self.on_alarm(kind, self.alarms[kind], True)
            elif not on and kind in self.alarms:
                reason = self.alarms.pop(kind)
                if self.on_alarm is not None:
                    self.on_alarm(kind, reason, False)

    # ---- the Prometheus text -------------------------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")

        family("requests_total", "counter", "answered requests by the model that answered and the route")
        for (by, route), count in sorted(self.requests.items()):
            lines.append(f'{PREFIX}_requests_total{{answered_by="{by}",route="{route}"}} {count}')
        answered = sum(self.requests.values())
        teacher = sum(count for (by, _), count in self.requests.items() if by == "teacher")
        family("routed_share", "gauge", "share of answered requests the teacher answered")
        lines.append(f"{PREFIX}_routed_share {teacher / answered if answered else 0.0}")
        family("errors_total", "counter", "error responses by HTTP status")
        for status, count in sorted(self.errors.items()):
            lines.append(f'{PREFIX}_errors_total{{status="{status}"}} {count}')
        family("fallbacks_total", "counter", "answers served by the other model or marked, by reason")
        for reason, count in sorted(self.fallbacks.items()):
            lines.append(f'{PREFIX}_fallbacks_total{{reason="{reason}"}} {count}')
        family("backend_errors_total", "counter", "failed asks of a backend")
        for name, count in sorted(self.backend_errors.items()):
            lines.append(f'{PREFIX}_backend_errors_total{{backend="{name}"}} {count}')
        family("backend_latency_seconds", "histogram", "time a backend took to answer (or fail)")
        for name, histogram in self.latency.items():
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), histogram.counts):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{PREFIX}_backend_latency_seconds_bucket{{backend="{name}",le="{le}"}} {cumulative}')
            lines.append(f'{PREFIX}_backend_latency_seconds_sum{{backend="{name}"}} {histogram.total}')
            lines.append(f'{PREFIX}_backend_latency_seconds_count{{backend="{name}"}} {histogram.count}')
        family("shadow_comparisons_total", "counter", "shadow requests compared")
        lines.append(f"{PREFIX}_shadow_comparisons_total {self.shadows}")
        family("rolling_agreement", "gauge", "share of the last shadow comparisons where both models agreed")
        lines.append(f"{PREFIX}_rolling_agreement {_value(self.rolling_agreement())}")
        family("rolling_confidence", "gauge", "mean confidence (mean token logprob) of the last student answers")
        lines.append(f"{PREFIX}_rolling_confidence {_value(self.rolling_confidence())}")
        family("judge_comparisons_total", "counter", "shadow comparisons by the judge's outcome")
        for outcome, count in sorted(self.judge_outcomes.items()):
            lines.append(f'{PREFIX}_judge_comparisons_total{{outcome="{outcome}"}} {count}')
        family("judge_cost_usd_total", "counter", "what the shadow judge's verdicts cost")
        lines.append(f"{PREFIX}_judge_cost_usd_total {self.judge_cost_usd}")
        family("judge_budget_spent", "gauge", "1 once the shadow judge's budget is spent (agreement only since)")
        lines.append(f"{PREFIX}_judge_budget_spent {int(self.judge_spent)}")
        family("rolling_judge_preference", "gauge", "mean judge preference for the student over the last judged "
               "shadow comparisons (1 the student's answer, 0.5 a tie, 0 the teacher's)")
        lines.append(f"{PREFIX}_rolling_judge_preference {_value(self.rolling_preference())}")
        family("alarm", "gauge", "1 while the rolling figure is below its floor")
        for kind in ("agreement", "confidence", "judge"):
            lines.append(f'{PREFIX}_alarm{{kind="{kind}"}} {int(kind in self.alarms)}')
        return "\n".join(lines) + "\n"


def _value(value: float | None) -> str:
    return "NaN" if value is None else repr(value)
