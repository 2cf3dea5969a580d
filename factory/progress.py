"""The live view of a run: a rich progress bar on a terminal, a log line every few seconds elsewhere."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task
from rich.text import Text

from apprentice.responses import TeacherResponse


@dataclass(slots=True)
class Usage:
    """What one kind of request cost this run. The teacher's figures are on `Counters`, under the same names."""

    requests: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # of input_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0   # of input_tokens: written to it
    cost_usd: float = 0.0

    def count(self, response: TeacherResponse, cost_usd: float) -> None:
        """One answer paid for (not one from the response cache)."""
        _count(self, response, cost_usd)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cached_input_tokens": self.cached_input_tokens,
                "cache_write_tokens": self.cache_write_tokens, "cost_usd": round(self.cost_usd, 6)}


def _count(usage: "Usage | Counters", response: TeacherResponse, cost_usd: float) -> None:
    usage.requests += 1
    usage.input_tokens += response.input_tokens
    usage.output_tokens += response.output_tokens
    usage.cached_input_tokens += response.cached_input_tokens
    usage.cache_write_tokens += response.cache_write_tokens
    usage.cost_usd += cost_usd


@dataclass(slots=True)
class Counters:
    total: int = 0
    resumed: int = 0  # records already on disk when the run started
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    judge: Usage = field(default_factory=Usage)  # the requests of model-backed checks (judge)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None  # when the last sample was written; closing the teacher is not run time

    def count(self, response: TeacherResponse, cost_usd: float) -> None:
        """One answer of the teacher paid for (not one from the response cache)."""
        _count(self, response, cost_usd)

    @property
    def written(self) -> int:
        return self.accepted + self.rejected + self.failed

    @property
    def done(self) -> int:
        return self.resumed + self.written

    @property
    def elapsed(self) -> float:
        return max(1e-9, (self.finished or time.monotonic()) - self.started)

    def eta(self) -> float | None:
        remaining = self.total - self.done
        if remaining <= 0:
            return 0.0
        if self.written == 0:
            return None
        return remaining * self.elapsed / self.written


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary_line(c: Counters) -> str:
    judged = c.accepted + c.rejected
    accepted_pct = 100.0 * c.accepted / judged if judged else 0.0
    return (
        f"{c.done}/{c.total} samples · accepted {accepted_pct:.0f}% · rejected {c.rejected} · failed {c.failed}"
        f" · {c.requests / c.elapsed:.1f} req/s · {c.output_tokens / c.elapsed:.0f} tok/s"
        f" · ${c.cost_usd + c.judge.cost_usd:.4f}{_judge_part(c)} · ETA {fmt_duration(c.eta())}"
    )


def _judge_part(c: Counters) -> str:
    """The judge's share of the cost, when the run has one that was asked anything."""
    judge = c.judge
    if not (judge.requests or judge.cache_hits):
        return ""
    return f" (judge ${judge.cost_usd:.4f}, {judge.requests} req)"


class _StatsColumn(ProgressColumn):
    def __init__(self, counters: Counters, note: Callable[[], str] | None = None) -> None:
        super().__init__()
        self.counters = counters
        self.note = note

    def render(self, task: Task) -> Text:
        c = self.counters
        judged = c.accepted + c.rejected
        pct = 100.0 * c.accepted / judged if judged else 0.0
        return Text.assemble(
            (f"acc {pct:.0f}%", "green"),
            (f" rej {c.rejected}", "yellow"),
            (f" fail {c.failed}" if c.failed else "", "red"),
            f" {c.requests / c.elapsed:.1f} req/s",
            f" {_si(c.output_tokens / c.elapsed)} tok/s",
            (f" ${c.cost_usd + c.judge.cost_usd:.4f}{_judge_part(c)}", "cyan"),
            f" ETA {fmt_duration(c.eta())}",
            (f" · {self.note()}" if self.note else "", "dim"),
        )


def _si(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


class ProgressView:
    def __init__(self, counters: Counters, console: Console, *, log_every_s: float = 10.0,
                 note: Callable[[], str] | None = None) -> None:
        self.counters = counters
        self.note = note  # one more line of state (batch mode: batches at the provider, next poll)
        self.console = console
        self.live = console.is_terminal and not console.quiet  # -q: no bar
        self.log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._progress: Progress | None = None
        self._task = None

    def start(self) -> None:
        if not self.live:
            return
        self._progress = Progress(
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            _StatsColumn(self.counters, self.note),
            console=self.console,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("generate", total=self.counters.total, completed=self.counters.done)
        self._progress.start()

    def refresh(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.counters.done)
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            note = f" · {self.note()}" if self.note else ""
            self.console.print(summary_line(self.counters) + note, highlight=False)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.counters.done)
            self._progress.stop()
            self._progress = None
