"""The `factory:` section of a recipe: pydantic models, loading, fingerprint.

Config layer: it imports no behaviour module (only apprentice's config base, the prompt-source settings and
the check registry's names). Every model forbids unknown keys, and every error of a recipe is reported at
once with its key path.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PlainValidator, ValidationInfo, field_validator, model_validator

from apprentice.config import Strict, load_section
from apprentice.hashing import stable_hash
from apprentice.tracking import unsupported
from quality_checks.registry import check_fingerprint, check_options, duplicate_names, options_model, parse_check_item

from .prompt_config import PromptsConfig

# One item of `factory.checks`: a bare name (`empty`) or a mapping of options (`{name: regex, pattern: ...}`).
# Validated by the check's own options model; errors carry the item's key path (factory.checks.2.pattern).
CheckItem = Annotated[Any, PlainValidator(parse_check_item)]


class Price(Strict):
    """`teacher.price`: overrides the price table (factory/pricing.py); the batch discount still applies."""

    input: float = Field(ge=0, description="USD per 1M input tokens")
    output: float = Field(ge=0, description="USD per 1M output tokens")
    cached_input: float | None = Field(
        default=None, ge=0,
        description="USD per 1M input tokens read from the provider's prompt cache; default: the input price",
    )
    cache_write: float | None = Field(
        default=None, ge=0,
        description="USD per 1M input tokens written to the prompt cache (Anthropic); default: 1.25 × input",
    )


class LogprobsConfig(Strict):
    """Teacher token logprobs for distillation, written to the run's `logprobs/` sidecar."""

    top_k: int = Field(default=20, ge=1, le=1000, description="alternatives per token (hosted OpenAI: at most 20)")
    token_ids: bool = Field(
        default=False,
        description="provider openai: ask the server for token ids (vLLM's return_tokens_as_token_ids)",
    )
    tokenizer: str | None = Field(
        default=None, description="provider openai: the served model's tokenizer (HF id or folder), to fingerprint"
    )
    shard_records: int = Field(
        default=256, ge=1, description="records per sidecar shard: bounds memory; not part of the fingerprint"
    )

    def fingerprint(self) -> dict[str, Any]:
        return self.model_dump(exclude={"shard_records"})


class StructuredOutput(Strict):
    """An answer that is one JSON object matching `json_schema`: OpenAI's `response_format` (json_schema,
    strict), Anthropic's one tool the model must call (the answer is its input). The other providers have none."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="the schema's name (Anthropic: the tool's name)")
    description: str = Field(default="", description="what the object is; Anthropic shows it as the tool's description")
    json_schema: dict[str, Any] = Field(
        description="a JSON schema of an object; OpenAI's strict mode wants every property required and "
        "additionalProperties: false"
    )

    @field_validator("json_schema")
    @classmethod
    def _an_object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError("the schema must describe an object (type: object)")
        return schema


# The providers whose APIs constrain an answer to a JSON schema (teacher.structured_output).
STRUCTURED_OUTPUT_PROVIDERS = ("openai", "anthropic")

# The providers' own limits for one batch (requests, bytes of the input), with a margin on the bytes.
BATCH_LIMITS = {"openai": (50_000, 190_000_000), "anthropic": (100_000, 250_000_000)}


class BatchOptions(Strict):
    """`teacher.mode: batch`: the OpenAI Batch API or Anthropic Message Batches, at the batch price."""

    max_requests: int | None = Field(
        default=None, ge=1, description="requests per batch; default and cap: OpenAI 50,000, Anthropic 100,000"
    )
    max_bytes: int | None = Field(
        default=None, ge=1024, description="bytes of requests per batch; default and cap: OpenAI 190 MB, Anthropic 250 MB"
    )
    poll_s: float = Field(default=30.0, gt=0, description="first wait between polls; grows 1.5× while nothing changes")
    poll_max_s: float = Field(default=600.0, gt=0, description="longest wait between polls")
    discount: float = Field(default=0.5, gt=0, le=1, description="batch price as a share of the list price")
    resend: int = Field(default=2, ge=0, description="rounds that send failed or expired requests again")

    def limits(self, provider: str) -> tuple[int, int]:
        max_requests, max_bytes = BATCH_LIMITS[provider]
        return min(self.max_requests or max_requests, max_requests), min(self.max_bytes or max_bytes, max_bytes)

# name → (lowest, highest) a drawn value may take; top_k is drawn as an integer.
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (1, 1_000_000),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
}
# What each provider accepts (the penalties are OpenAI's; vLLM and the local teacher take top_k).
PROVIDER_PARAMS = {
    "openai": set(PARAM_BOUNDS),
    "anthropic": {"temperature", "top_p", "top_k"},
    "local": {"temperature", "top_p", "top_k"},
    "vllm": {"temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty"},
}
# Providers that run the model in this process: no API key, no price, no rate limit of a server.
IN_PROCESS = ("local", "vllm")


class ParamRanges(Strict):
    """`[low, high]` per sampling parameter; each request draws its own value (see factory/decide.py)."""

    temperature: tuple[float, float] | None = None
    top_p: tuple[float, float] | None = None
    top_k: tuple[int, int] | None = None
    frequency_penalty: tuple[float, float] | None = None
    presence_penalty: tuple[float, float] | None = None

    @field_validator("*")
    @classmethod
    def _ordered_and_in_bounds(cls, value: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        if value is None:
            return value
        low, high = value
        lowest, highest = PARAM_BOUNDS[info.field_name]
        if low > high:
            raise ValueError(f"[{low}, {high}]: low must not exceed high; write [{high}, {low}]")
        if low < lowest or high > highest or (info.field_name == "top_p" and low <= 0):
            bounds = "(0, 1]" if info.field_name == "top_p" else f"[{lowest}, {highest}]"
            raise ValueError(f"[{low}, {high}]: values must lie in {bounds}")
        return value

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {name: value for name, value in self if value is not None}

    def draw(self, prompt_id: str, sample_index: int) -> dict[str, float | int]:
        """This sample's values: uniform in each range, seeded by prompt id and sample index only, so that
        a resumed run (or the same prompt in another run) builds the same request body; 3 decimals."""
        rng = random.Random(stable_hash("param_ranges", prompt_id, str(sample_index)))
        drawn: dict[str, float | int] = {}
        for name, (low, high) in sorted(self.ranges().items()):
            value = rng.randint(low, high) if name == "top_k" else round(rng.uniform(low, high), 3)
            drawn[name] = min(max(value, low), high)  # rounding must not step out of the range
        return drawn


DEFAULT_MAX_CONCURRENCY = 64  # requests in flight to an API when the recipe does not say
# The default of `teacher.client` where a recipe leaves it out (raw unless set): an operator's switch back to the
# SDKs without editing recipes, and how the tests run every hosted-teacher test on both request paths.
CLIENT_ENV = "APPRENTICE_TEACHER_CLIENT"


class TeacherConfig(Strict):
    provider: Literal["openai", "anthropic", "local", "vllm"] = "local"
    mode: Literal["online", "batch"] = Field(
        default="online", description="online: one request at a time, rate-limited; batch: the providers' Batch APIs"
    )
    batch: BatchOptions = Field(default_factory=BatchOptions)
    model: str = "builtin:smollm2-135m-instruct"
    base_url: str | list[str] | None = Field(
        default=None, description="an OpenAI-compatible server, or a list of them: a fleet, least outstanding "
        "requests first, each with its own limits and circuit breaker (factory/teachers/fleet.py)")
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the API key (default by provider)"
    )
    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.8, "max_tokens": 512})
    param_ranges: ParamRanges | None = Field(
        default=None,
        description="{temperature: [0.3, 1.1], top_p: [0.8, 1.0]}: each sample draws its own values (seeded by "
        "prompt id and sample index, so a resumed run sends the same bodies); they override params",
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, le=4096,
        description="requests in flight at most; default: 64 for an API, what the model can batch for local and vllm",
    )
    follow_latency: bool | None = Field(
        default=None,
        description="concurrency also follows latency, backing off when p95 latency climbs while throughput does "
        "not (a vLLM or SGLang server queues instead of answering 429; max_concurrency stays the ceiling); default: "
        "on with a base_url, off for the hosted APIs; not part of the fingerprint",
    )
    rpm: float | None = Field(default=None, gt=0, description="requests per minute cap; headers rule otherwise")
    tpm: float | None = Field(default=None, gt=0, description="tokens per minute cap; headers rule otherwise")
    timeout_s: float = Field(default=600.0, gt=0)
    client: Literal["raw", "sdk"] | None = Field(
        default=None,
        description="providers openai and anthropic: raw (default) sends and reads each request on one pooled "
        "aiohttp session, sdk through the official SDK; the same bodies, headers and errors either way; not part "
        f"of the fingerprint (default from ${CLIENT_ENV} when set)",
    )
    max_retries: int = Field(default=8, ge=0, description="retries per request for 429, 5xx, timeouts")
    price: Price | None = Field(default=None, description="overrides the price table (genai-prices)")
    batch_size: int = Field(default=8, ge=1, description="provider local: prompts per generate() call")
    device: str | None = Field(default=None, description="provider local: cpu, cuda, …; default picks")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="provider vllm: keyword arguments for vllm.LLM (tensor_parallel_size, gpu_memory_utilization, "
        "max_model_len, dtype, enforce_eager, …); not part of the fingerprint",
    )
    logprobs: LogprobsConfig | None = Field(
        default=None, description="{top_k: 20}: store the teacher's top-k token logprobs for distillation"
    )
    context: list[dict[str, str]] | None = Field(
        default=None,
        description="messages (instructions, few-shot turns) sent to the teacher before every prompt and NOT "
        "stored in the records: the student learns to behave as if it had this context",
    )
    structured_output: StructuredOutput | None = Field(
        default=None,
        description="{name, json_schema}: every answer is one JSON object matching the schema (providers openai "
        "and anthropic)",
    )

    @model_validator(mode="after")
    def _defaults(self) -> "TeacherConfig":
        if self.api_key_env is None:
            self.api_key_env = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(self.provider)
        if self.provider in IN_PROCESS:
            if self.client is not None:
                raise ValueError(f"client is for providers openai and anthropic; provider {self.provider} runs in "
                                 "this process: remove it")
        elif self.client is None:
            chosen = os.environ.get(CLIENT_ENV) or "raw"
            if chosen not in ("raw", "sdk"):
                raise ValueError(f"${CLIENT_ENV}={chosen!r}: set it to raw or sdk, or unset it")
            self.client = chosen
        if self.mode == "batch" and self.provider not in BATCH_LIMITS:
            raise ValueError(f"mode: batch is for provider openai or anthropic, not {self.provider}; "
                             "a local teacher batches on its own (batch_size)")
        if self.max_tokens < 1:
            raise ValueError("params.max_tokens must be at least 1")
        if isinstance(self.base_url, list):
            if self.provider != "openai" or self.mode != "online":
                raise ValueError("base_url: a list of servers (a fleet) is for provider openai in mode online; "
                                 "give one URL")
            if not self.base_url or len(set(self.base_url)) != len(self.base_url):
                raise ValueError("base_url: a fleet lists one or more distinct URLs")
        if self.engine_args and self.provider != "vllm":
            raise ValueError(f"engine_args are for provider vllm, not {self.provider}; remove them or set "
                             "provider: vllm")
        if self.logprobs is not None:
            if self.provider == "anthropic":
                raise ValueError(
                    "logprobs: the Anthropic API returns no token logprobs; remove teacher.logprobs, or use "
                    "provider: openai (any OpenAI-compatible server) or provider: local"
                )
            if self.provider in IN_PROCESS and (self.logprobs.token_ids or self.logprobs.tokenizer):
                raise ValueError(f"logprobs.token_ids and logprobs.tokenizer are for provider openai; provider "
                                 f"{self.provider} always stores token ids with the model's own tokenizer")
            if self.provider == "openai" and self.base_url is None and self.logprobs.top_k > 20:
                raise ValueError(f"logprobs.top_k={self.logprobs.top_k}: the OpenAI API returns at most 20")
        if self.param_ranges is not None:
            ranges = self.param_ranges.ranges()
            if not ranges:
                raise ValueError("param_ranges is empty; name at least one parameter, e.g. {temperature: [0.3, 1.1]}")
            unsupported = sorted(set(ranges) - PROVIDER_PARAMS[self.provider])
            if unsupported:
                raise ValueError(
                    f"param_ranges.{unsupported[0]}: provider {self.provider} has no such parameter; "
                    f"it takes {sorted(PROVIDER_PARAMS[self.provider])}"
                )
            if self.provider == "anthropic" and "temperature" in ranges and ranges["temperature"][1] > 1:
                raise ValueError("param_ranges.temperature: the Anthropic API takes temperatures in [0, 1]")
        if self.structured_output is not None and self.provider not in STRUCTURED_OUTPUT_PROVIDERS:
            raise ValueError(f"structured_output: provider {self.provider} cannot constrain its answers to a schema; "
                             f"remove it, or use provider {' or '.join(STRUCTURED_OUTPUT_PROVIDERS)}")
        for i, message in enumerate(self.context or []):
            if set(message) != {"role", "content"} or message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"context[{i}] must be {{role: system|user|assistant, content: ...}}")
        return self

    def with_context(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages the teacher sees: its context, then the prompt (one system message, merged)."""
        if not self.context:
            return messages
        context = list(self.context)
        if messages and messages[0]["role"] == "system":
            if context[0]["role"] == "system":
                merged = context[0]["content"] + "\n\n" + messages[0]["content"]
                return [{"role": "system", "content": merged}] + context[1:] + messages[1:]
            return [messages[0]] + context + messages[1:]
        return context + messages

    @property
    def follows_latency(self) -> bool:
        """follow_latency, or on where a base_url names a server of one's own (it queues rather than refuses)."""
        return self.follow_latency if self.follow_latency is not None else self.base_url is not None

    @property
    def concurrency_cap(self) -> int:
        """max_concurrency, or the API default when the recipe leaves it to the provider."""
        return self.max_concurrency or DEFAULT_MAX_CONCURRENCY

    @property
    def max_tokens(self) -> int:
        value = self.params.get("max_tokens", self.params.get("max_new_tokens", 512))
        return int(value)


class BestOfConfig(Strict):
    """Of the samples of one prompt that passed every check, keep the best `keep` by one check's score."""

    by: str = Field(min_length=1, description="the check whose score ranks the samples, higher is better: "
                    "judge, verifier, or a check's label")
    keep: int = Field(default=1, ge=1, description="samples kept per prompt; the others are rejected by best_of")


def ranking_check(by: str, checks: list[Any]) -> str | None:
    """The name (label) in the records of the check `best_of.by` means: its label, or its name when only
    one check of that name is listed."""
    names = [check_options(parse_check_item(check)) for check in checks]
    if any(options.check_name == by for options in names):
        return by
    same = [options.check_name for options in names if options.name == by]
    return same[0] if len(same) == 1 else None


class RayConfig(Strict):
    """`factory.ray`, for `runner: ray`: where the cluster is and how the prompts are split (docs/ray.md)."""

    address: str | None = Field(
        default=None, description="a running cluster (`auto`, or ray://host:10001); default: a local Ray in this process"
    )
    workers: int = Field(default=2, ge=1, le=4096, description="shards generated at once, one Ray task each")
    shards: int | None = Field(
        default=None, ge=1, le=65536,
        description="how many parts the prompts are split into by a hash of their id; default: workers. Fixed for "
        "a run directory (it decides which shard holds each sample), so set it when workers may change",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Ray CPUs each shard's task reserves")
    max_restarts: int = Field(default=3, ge=0, description="times Ray restarts a shard whose worker died")
    gpus_per_worker: float | None = Field(
        default=None, ge=0,
        description="provider local or vllm: GPUs each worker's teacher engine reserves (Ray's num_gpus for its "
        "actor); default: 1 for vllm, 0 for local (on the CPU); set tensor_parallel_size's count for a vLLM engine "
        "over several GPUs",
    )
    pass_keys: bool = Field(
        default=False,
        description="send the API key variables the recipe names from the driver's environment with each task "
        "(Ray's runtime_env: they then sit in the cluster's task metadata); default: the workers read their own "
        "environment (a local Ray started here inherits the driver's)",
    )

    @property
    def shard_count(self) -> int:
        return self.shards or self.workers


class FactoryConfig(Strict):
    output_dir: Path = Path("runs/demo")
    prompts: PromptsConfig
    samples_per_prompt: int = Field(default=1, ge=1, le=128)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    checks: list[CheckItem] = Field(
        default_factory=lambda: ["empty", "truncated", "refusal"],
        description="quality checks in order, cheapest first: names, or mappings {name: ..., option: ...}",
    )
    best_of: BestOfConfig | None = Field(
        default=None, description="{by: judge, keep: 1}: keep the best samples of each prompt by a check's score"
    )
    budget_usd: float | None = Field(default=None, ge=0)
    runner: Literal["local", "ray"] = Field(
        default="local", description="local: this process; ray: shards of the prompts on Ray workers (docs/ray.md)"
    )
    ray: RayConfig | None = Field(default=None, description="the Ray runner's settings (runner: ray)")
    report_to: str | list[str] | None = Field(
        default=None, description="tracker for the final run figures: "
        "tensorboard or none; unset: sft.report_to of the same recipe (its tensorboard part)")

    @field_validator("report_to")
    @classmethod
    def _tracked(cls, value: str | list[str] | None) -> str | list[str] | None:
        if other := unsupported(value):
            raise ValueError(f"{other}: the factory logs to tensorboard only (or none); wandb, mlflow and trackio "
                             "get the trainer's figures through sft.report_to")
        return value

    @classmethod
    def item_model(cls, field: str, item: Any) -> type[BaseModel] | None:
        return options_model(item) if field == "checks" else None

    @field_validator("best_of")
    @classmethod
    def _ranking_check_exists(cls, best_of: BestOfConfig | None, info: ValidationInfo) -> BestOfConfig | None:
        if best_of is None or "checks" not in info.data or "samples_per_prompt" not in info.data:
            return best_of  # the checks have their own errors
        n = info.data["samples_per_prompt"]
        if best_of.keep >= n:
            raise ValueError(f"keep: {best_of.keep} of samples_per_prompt {n} keeps every sample; "
                             "raise factory.samples_per_prompt or lower best_of.keep")
        if ranking_check(best_of.by, info.data["checks"]) is None:
            names = [check_options(parse_check_item(c)).check_name for c in info.data["checks"]]
            raise ValueError(f"by: no check {best_of.by!r} in factory.checks ({', '.join(names) or 'none'}); "
                             "name the check whose score ranks the samples, e.g. judge")
        return best_of

    @field_validator("checks")
    @classmethod
    def _distinct_check_names(cls, checks: list[Any]) -> list[Any]:
        twice = duplicate_names(checks)
        if twice:
            raise ValueError(f"two checks named {twice}; give one a `label:` so rejections say which")
        return checks

    @model_validator(mode="after")
    def _ray_settings(self) -> "FactoryConfig":
        if self.runner == "ray":
            if self.ray is None:
                self.ray = RayConfig()
            if self.teacher.mode == "batch":
                raise ValueError("runner: ray sends online requests; a Batch API needs no workers (runner: local)")
            if self.teacher.provider in IN_PROCESS:
                if self.ray.gpus_per_worker is None:  # a vLLM engine needs its GPU; transformers runs on the CPU
                    self.ray.gpus_per_worker = 1.0 if self.teacher.provider == "vllm" else 0.0
            elif self.ray.gpus_per_worker:
                raise ValueError(f"ray.gpus_per_worker is for a teacher loaded in each worker (provider local or "
                                 f"vllm); provider {self.teacher.provider} is behind an API: remove it")
            if self.prompts.self_instruct is not None:
                raise ValueError("runner: ray takes a prompts file, grid or dataset; run the self-instruct "
                                 "expansion with runner: local first, then point prompts.path at its prompts file")
        elif self.ray is not None:
            raise ValueError("ray: settings for runner: ray; set factory.runner: ray or remove them")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """What decides the content of a sample. Two runs may share a directory only if these agree."""
        teacher = self.teacher
        return {
            "provider": teacher.provider,
            "model": teacher.model,
            "base_url": teacher.base_url,
            "params": teacher.params,
            "samples_per_prompt": self.samples_per_prompt,
            "system": self.prompts.system,
            "checks": [check_fingerprint(check) for check in self.checks],
            **({"context": teacher.context} if teacher.context else {}),
            # Only when set, so that the fingerprints of existing runs stay what they were.
            **({"logprobs": teacher.logprobs.fingerprint()} if teacher.logprobs is not None else {}),
            **({"param_ranges": teacher.param_ranges.model_dump(exclude_none=True, mode="json")}
               if teacher.param_ranges is not None else {}),
            **({"best_of": self.best_of.model_dump()} if self.best_of is not None else {}),
            **({"structured_output": teacher.structured_output.model_dump()}
               if teacher.structured_output is not None else {}),
            # The shard count decides where each sample's records and cached answer are: fixed for a directory.
            **({"runner": "ray", "shards": self.ray.shard_count} if self.runner == "ray" and self.ray else {}),
        }

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_factory_config(path: Path | str, overrides: list[str] | None = None) -> FactoryConfig:
    """The validated `factory:` section of a recipe file, after `--set factory.key=value` overrides.
    Relative prompt paths are relative to the current directory, as the user typed the command there."""
    return load_section(FactoryConfig, "factory", path, overrides)
