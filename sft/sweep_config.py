"""The `sft.sweep:` section: which settings a sweep tries, on how much data, judged by what.

Config layer: it imports no behaviour module (sft/sweep.py runs it). A parameter's values are either a list
(each tried as it is) or a range `{low, high, log}` that Optuna's TPE sampler draws from.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from apprentice.config import Strict


class SweepRange(Strict):
    low: float
    high: float
    log: bool = Field(default=False, description="draw on a log scale (learning rates)")

    @model_validator(mode="after")
    def _ordered(self) -> "SweepRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        return self


class SweepSpace(Strict):
    """Each key names the sft setting it varies; a key left out keeps the recipe's value."""

    temperature: list[float] | SweepRange | None = Field(default=None, description="sft.distill.temperature")
    alpha: list[float] | SweepRange | None = Field(default=None, description="sft.distill.alpha (KL weight)")
    learning_rate: list[float] | SweepRange | None = Field(default=None, description="sft.learning_rate")
    epochs: list[float] | SweepRange | None = Field(default=None, description="sft.epochs")
    lora_r: list[int] | None = Field(default=None, description="sft.lora.r (lora.alpha keeps its ratio to r)")
    student: list[str] | None = Field(default=None, description="sft.student: base models of several sizes")
    method: list[str] | None = Field(default=None, description="sft.method values: sft, kd (or distill: the teacher's logprobs), on_policy")

    @model_validator(mode="after")
    def _something_to_vary(self) -> "SweepSpace":
        chosen = self.chosen()
        if not chosen:
            raise ValueError("name at least one setting to vary: temperature, alpha, learning_rate, epochs, "
                             "lora_r, student, method")
        for name, values in chosen.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"{name}: an empty list; give at least one value")
        return self

    def chosen(self) -> dict[str, list | SweepRange]:
        return {name: value for name, value in self if value is not None}


class SweepSettings(Strict):
    trials: int = Field(default=8, ge=1, description="trials in all, those of an earlier (killed) sweep included")
    fraction: float = Field(default=0.1, gt=0, le=1, description="share of the training split each trial trains on")
    space: SweepSpace
    objective: Literal["eval", "held_out_loss"] = Field(
        default="eval", description="eval: the student's overall score on the eval: section's golden sets (the "
        "gate's score; higher is better); held_out_loss: cross-entropy on the sft held-out split (lower is better)")
    prune: bool = Field(default=True, description="stop a trial whose held-out loss is above the median of "
                        "earlier trials at the same step (Optuna's MedianPruner)")
    prune_after_trials: int = Field(default=3, ge=0, description="trials finished before any is pruned")
    seed: int | None = Field(default=None, description="the sampler's seed (default: sft.seed)")
