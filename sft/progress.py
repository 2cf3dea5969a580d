"""Training progress: a rich bar on a terminal (step, loss, tokens/s, ETA), a log line elsewhere.

The Trainer's own tqdm bar is turned off (`disable_tqdm=True`): it knows neither tokens nor held-out
loss, and in a log file it is a wall of carriage returns.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from factory.progress import fmt_duration

LOG_EVERY_S = 10.0


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def clock_named(name: str) -> Callable[[], float]:
    """The clock of `sft.max_seconds_clock`: wall (monotonic), or cpu (this process's CPU time, all threads)."""
    return time.process_time if name == "cpu" else time.monotonic


class RichProgress:
    """A Trainer callback: transformers calls `callback.on_<event>(args, state, control, ...)` on each one.

    Not a `TrainerCallback` subclass: that class's module imports torch (through `training_args`), and
    sft/train.py imports this module at its top while `import sft.train` stays free of torch. The events
    this class does not handle are no-ops, as on TrainerCallback (a None result leaves `control` as it is).
    """

    def __init__(self, console: Any, budget_s: float | None = None, budget_clock: str = "wall") -> None:
        self.console = console
        # sft.max_seconds: the ETA is the budget's when it ends first (a budgeted run's max_steps is a ceiling)
        self.budget_s = budget_s
        self.clock = clock_named(budget_clock)
        self.budget_started = 0.0
        self.progress: Any = None
        self.task: Any = None
        self.started = 0.0
        self.first_step = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.tokens = 0.0
        self.last_line = 0.0

    def _stats(self, state: Any) -> str:
        done = state.global_step - self.first_step
        elapsed = max(1e-9, time.monotonic() - self.started)
        remaining = (state.max_steps - state.global_step) * elapsed / done if done else None
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"held-out {self.eval_loss:.4f}")
        if self.tokens:
            parts.append(f"{self.tokens / elapsed:,.0f} tok/s")
        if self.budget_s is not None:
            used = self.clock() - self.budget_started
            cpu = self.clock is time.process_time
            parts.append(f"budget {used:,.0f}/{self.budget_s:,.0f} {'CPU ' if cpu else ''}s")
            if used > 0:  # the budget's remainder in wall seconds, at the pace the clock has kept so far
                left = max(0.0, self.budget_s - used) * (elapsed / used if cpu else 1.0)
                remaining = left if remaining is None else min(remaining, left)
        parts.append(f"ETA {fmt_duration(remaining)}")
        return " · ".join(parts)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = self.last_line = time.monotonic()
        self.budget_started = self.clock()
        self.first_step = state.global_step
        if self.console.is_terminal and not self.console.quiet:  # -q: no bar
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, stats="")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.eval_loss = float(logs["eval_loss"])
        if "num_tokens" in logs:  # TRL counts the tokens it trained on, since the start of this run
            self.tokens = float(logs["num_tokens"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats(state))
        elif time.monotonic() - self.last_line >= LOG_EVERY_S or state.global_step == state.max_steps:
            self.last_line = time.monotonic()
            self.console.print(self._stats(state), highlight=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats(state))
            self.progress.stop()
        else:
            self.console.print(self._stats(state), highlight=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _ignore
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
