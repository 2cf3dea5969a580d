"""The `eval:` section of a recipe: which models answer which golden sets, how they are scored, the gate.

Config layer: it imports no behaviour module. Every problem is reported at once with its `eval.` key path,
through the one recipe loader (apprentice/config.py).
A model is a factory teacher (any backend: local, openai, anthropic) with a name; local models run
in-process, hosted ones go through the factory pipeline (cache, rate limits, cost).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from apprentice.config import Strict, load_section
from apprentice.tracking import unsupported
from factory.recipe import TeacherConfig

# The metrics a golden line or `eval.metrics` may name; eval/metrics.py implements each (and asserts so).
METRIC_NAMES = ("exact", "normalized", "token_f1", "rouge_l", "regex", "json_valid", "json_schema", "json_match",
                "instruction", "number", "verifier", "judge")


class ModelConfig(TeacherConfig):
    name: str = Field(min_length=1, description="how the model is called in tables and in the gate")
    role: str | None = Field(default=None, description="teacher | student | baseline (for the report; optional)")


class JudgeConfig(TeacherConfig):
    rubric: str | None = Field(
        default=None, description="score each answer 1-10 against this rubric (adds the `judge` metric)"
    )
    pairwise: bool = Field(default=True, description="judge the student against the reference model, both orders")

    @model_validator(mode="after")
    def _own_verdict_format(self) -> "JudgeConfig":
        if self.structured_output is not None:
            raise ValueError("structured_output: the judge asks for its own verdict format; remove it")
        return self


class GateConfig(Strict):
    min_retention: float = Field(default=0.95, gt=0, description="student score ÷ reference score, overall")
    min_score: float | None = Field(default=None, ge=0, le=1, description="and/or an absolute floor")
    min_speedup: float | None = Field(
        default=None, gt=0, description="reference p50 latency ÷ student p50 latency, at batch 1")
    max_cost_ratio: float | None = Field(
        default=None, gt=0, description="student $ per 1k answers ÷ the reference's")
    max_latency_p99_s: float | None = Field(default=None, gt=0, description="the student's p99 latency, seconds")
    max_regression: float | None = Field(
        default=None, ge=0, le=1, description="the most the student may score below the base model on the "
        "eval.regression sets (a fraction: 0.05 = 5 points)")


class CostConfig(Strict):
    """What an hour of the machine a local model (or a served one: your own OpenAI-compatible server, with no
    price) runs on costs: its $ per 1k answers follows from the throughput eval measures (hosted models are
    priced from their tokens)."""

    gpu_hour_usd: float | None = Field(default=None, ge=0, description="USD per GPU hour (models on cuda)")
    cpu_hour_usd: float | None = Field(default=None, ge=0, description="USD per hour of the CPU machine")
    served_on: Literal["gpu", "cpu"] = Field(
        default="gpu", description="what your OpenAI-compatible servers (models with a base_url) run on: "
        "gpu_hour_usd or cpu_hour_usd prices their throughput")


class EvalConfig(Strict):
    output_dir: Path = Path("runs/eval-demo")
    golden: list[Path] = Field(min_length=1, description="golden JSONL files: {id?, prompt, reference?, metric?, tags?}")
    models: list[ModelConfig] = Field(min_length=1)
    reference: str | None = Field(
        default=None, description="the model retention is measured against (default: the one with role teacher)"
    )
    student: str | None = Field(
        default=None, description="the model the gate judges (default: the one with role student, else the last)"
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["normalized"], description="metrics for golden lines that name none"
    )
    params: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.0, "max_tokens": 256},
        description="sampling settings for models that set no params of their own (greedy by default)",
    )
    verifier: str | None = Field(default=None, description="module:function for the `verifier` metric")
    regression: list[Path] = Field(
        default_factory=list, description="general sets scored apart from the task's, to see what a student forgot "
        "(data/golden/instructions.jsonl: instructions checked by code); lines without a metric use `instruction`")
    fidelity: int = Field(
        default=0, ge=0, description="score up to N samples of the student's sft held-out split (the teacher's "
        "answers to prompts it never saw) with the task's metrics; needs a local student with its lineage.json")
    base: str | None = Field(
        default=None, description="the model the student's regression is measured against (default: the one with "
        "role baseline)")
    judge: JudgeConfig | None = None
    gate: GateConfig | None = None
    perf_prompts: int = Field(default=8, ge=0, description="local models: prompts timed one at a time for latency")
    timed_requests: int = Field(
        default=0, ge=0, description="hosted models: requests sent one at a time, past the cache, for request "
        "latency (paid: they are real requests); 0 = hosted models are priced, not timed")
    served_concurrency: int = Field(
        default=0, ge=0, description="models on an OpenAI-compatible server (base_url): every golden prompt sent "
        "past the cache, this many at once, for throughput (answers/s, output tokens/s) and, with eval.cost and no "
        "price, $ per 1k answers (real requests to the server); 0 = not measured")
    cost: CostConfig = Field(default_factory=CostConfig)
    bootstrap: int = Field(
        default=1000, ge=100, description="BCa bootstrap resamples (graded means, retention; pass/fail means use Wilson)"
    )
    seed: int = 0
    cascade: bool = Field(default=True, description="simulate student → teacher routing by student confidence")
    speculative: bool = Field(
        default=True, description="local student and teacher with one tokenizer: assisted-generation speed-up"
    )
    report_to: str | list[str] | None = Field(
        default=None, description="tracker for the scores, retention and gate: "
        "tensorboard or none; unset: sft.report_to of the same recipe (its tensorboard part)")

    @field_validator("report_to")
    @classmethod
    def _tracked(cls, value: str | list[str] | None) -> str | list[str] | None:
        if other := unsupported(value):
            raise ValueError(f"{other}: the eval logs to tensorboard only (or none); wandb, mlflow and trackio "
                             "get the trainer's figures through sft.report_to")
        return value

    @model_validator(mode="after")
    def _names(self) -> "EvalConfig":
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(sorted(METRIC_NAMES))}")
        if self.served_concurrency and not any(m.base_url is not None for m in self.models):
            raise ValueError(f"served_concurrency: {self.served_concurrency}: no model has a base_url (an "
                             "OpenAI-compatible server of your own) to measure; set one, or remove served_concurrency")
        for key in ("reference", "student", "base"):
            value = getattr(self, key)
            if value is not None and value not in names:
                raise ValueError(f"{key}: {value!r} is not one of the models {names}")
        return self

    def reference_name(self) -> str | None:
        if self.reference:
            return self.reference
        return next((m.name for m in self.models if m.role == "teacher"), None)

    def base_name(self) -> str | None:
        if self.base:
            return self.base
        return next((m.name for m in self.models if m.role == "baseline"), None)

    def student_name(self) -> str:
        if self.student:
            return self.student
        return next((m.name for m in self.models if m.role == "student"), self.models[-1].name)


def load_eval_config(path: Path | str, overrides: list[str] | None = None) -> EvalConfig:
    """The validated `eval:` section of a recipe file, after `--set eval.key=value` overrides."""
    return load_section(EvalConfig, "eval", path, overrides)
