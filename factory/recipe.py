"""The `factory:` section of a recipe: pydantic models, loading, `--set` overrides, fingerprint.

Every model forbids unknown keys, and every error of a recipe is reported at once with its key path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo, field_validator, model_validator,
)

from quality_checks.base import check_fingerprint, check_options, duplicate_names, parse_check_item

from .grid import GridConfig

# One item of `factory.checks`: a bare name (`empty`) or a mapping of options (`{name: regex, pattern: ...}`).
# Validated by the check's own options model; errors carry the item's key path (factory.checks.2.pattern).
CheckItem = Annotated[Any, PlainValidator(parse_check_item)]


class RecipeError(Exception):
    """A recipe that cannot be used; the message names the file, the keys and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptsConfig(Strict):
    path: Path | None = Field(
        default=None, description="JSONL file, one prompt a line: {id?, prompt: str | [messages], attributes?}"
    )
    grid: GridConfig | None = Field(default=None, description="prompts from a template × attribute values")
    system: str | None = Field(default=None, description="system message prepended to prompts that have none")

    @model_validator(mode="after")
    def _one_source(self) -> "PromptsConfig":
        if (self.path is None) == (self.grid is None):
            raise ValueError("give either path: FILE.jsonl or grid: {template, attributes}")
        return self


class Price(Strict):
    input: float = Field(ge=0, description="USD per 1M input tokens")
    output: float = Field(ge=0, description="USD per 1M output tokens")


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


class TeacherConfig(Strict):
    provider: Literal["openai", "anthropic", "local"] = "local"
    model: str = "builtin:smollm2-135m-instruct"
    base_url: str | None = None
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the API key (default by provider)"
    )
    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.8, "max_tokens": 512})
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    rpm: float | None = Field(default=None, gt=0, description="requests per minute cap; headers rule otherwise")
    tpm: float | None = Field(default=None, gt=0, description="tokens per minute cap; headers rule otherwise")
    timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=8, ge=0, description="retries per request for 429, 5xx, timeouts")
    price: Price | None = Field(default=None, description="overrides the built-in price table")
    batch_size: int = Field(default=8, ge=1, description="provider local: prompts per generate() call")
    device: str | None = Field(default=None, description="provider local: cpu, cuda, …; default picks")
    logprobs: LogprobsConfig | None = Field(
        default=None, description="{top_k: 20}: store the teacher's top-k token logprobs for distillation"
    )
    context: list[dict[str, str]] | None = Field(
        default=None,
        description="messages (instructions, few-shot turns) sent to the teacher before every prompt and NOT "
        "stored in the records: the student learns to behave as if it had this context",
    )

    @model_validator(mode="after")
    def _defaults(self) -> "TeacherConfig":
        if self.api_key_env is None:
            self.api_key_env = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(self.provider)
        if self.max_tokens < 1:
            raise ValueError("params.max_tokens must be at least 1")
        if self.logprobs is not None:
            if self.provider == "anthropic":
                raise ValueError(
                    "logprobs: the Anthropic API returns no token logprobs; remove teacher.logprobs, or use "
                    "provider: openai (any OpenAI-compatible server) or provider: local"
                )
            if self.provider == "local" and (self.logprobs.token_ids or self.logprobs.tokenizer):
                raise ValueError("logprobs.token_ids and logprobs.tokenizer are for provider openai; the local "
                                 "teacher always stores token ids with its own tokenizer")
            if self.provider == "openai" and self.base_url is None and self.logprobs.top_k > 20:
                raise ValueError(f"logprobs.top_k={self.logprobs.top_k}: the OpenAI API returns at most 20")
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
            **({"best_of": self.best_of.model_dump()} if self.best_of is not None else {}),
        }

    def fingerprint_hash(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Recipe(Strict):
    """A whole recipe file. Each command validates only its own section; the others pass through."""

    model_config = ConfigDict(extra="forbid")
    factory: FactoryConfig | None = None
    sft: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None


def _set_dotted(data: dict[str, Any], dotted: str, raw_value: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}={raw_value}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw_value) if raw_value != "" else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected dotted.key=value, e.g. --set factory.samples_per_prompt=4")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), value)


def with_section_prefix(error: ValidationError, section: str) -> ValidationError:
    """The same errors with `section.` in front of each key path, so they read like the recipe file."""
    errors = []
    for item in error.errors():
        item = dict(item)
        item["loc"] = (section, *item["loc"])
        errors.append(item)
    return ValidationError.from_exception_data(error.title, errors)  # type: ignore[arg-type]


def format_validation_error(path: Path | str, error: ValidationError) -> str:
    lines = [f"{path}: {error.error_count()} problem(s) in the recipe:"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the README for the keys of each section)"
        elif item["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_recipe_data(path: Path | str, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping with factory:, sft: and/or eval: sections")
    apply_overrides(data, overrides or [])
    return data


def load_factory_config(path: Path | str, overrides: list[str] | None = None) -> FactoryConfig:
    data = load_recipe_data(path, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(path, exc)) from None
    if recipe.factory is None:
        raise RecipeError(f"{path}: no `factory:` section; add one (see data/recipes/demo.yaml)")
    config = recipe.factory
    # Relative prompt paths are relative to the current directory, as the user typed the command there.
    return config
