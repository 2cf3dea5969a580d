"""The Check protocol, the Verdict it returns, per-check options, and the registry recipes name checks from.

A recipe lists checks in order, each either a bare name (`empty`) or a mapping with options
(`{name: regex, pattern: "...", mode: must_not_match}`). Options are pydantic models that forbid unknown
keys, so a typo is reported with its key path (`factory.checks.2.pattern`) together with every other
problem of the recipe. Things that need the file system or an import (a schema file, a golden set, a
verifier function) are checked when the checks are built, before anything is sent, and all at once.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from factory.records import Sample


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str | None = None
    score: float | None = None


PASS = Verdict(True)


class Check(Protocol):
    name: str

    def __call__(self, sample: "Sample") -> Verdict: ...


class AsyncCheck(Protocol):
    """A check that waits on I/O, such as an LLM judge: it has `averdict` instead of `__call__`. The
    pipeline awaits it in its place in recipe order, so a sample reaches it only after every check before
    it passed: put it after the cheap ones. A check that asks a model names its teacher in `teacher` and
    is handed the run's way of asking (limiter, cache, budget) through `connect` before the first sample."""

    name: str

    async def averdict(self, sample: "Sample") -> Verdict: ...


class RunWideCheck(Check, Protocol):
    """A check with memory across the run (dedup). The pipeline calls `remember` for every accepted
    sample, and for every sample already in accepted.jsonl when a run resumes, so only accepted samples
    enter its index and a resumed run sees what was accepted before the crash."""

    def remember(self, sample: "Sample") -> None: ...


class CheckOptions(BaseModel):
    """Options every check takes. A check with options subclasses this and adds its own fields."""

    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="name in rejected_by and in stats; needed when one check appears twice",
    )

    @property
    def check_name(self) -> str:
        return self.label or self.name

    def fingerprint_data(self) -> dict[str, Any]:
        """The options that decide which samples pass; a check whose options include settings that do not
        (a judge's concurrency) leaves those out, so changing them does not refuse a resume."""
        return self.model_dump(mode="json", exclude_defaults=True)


class CheckConfigError(ValueError):
    """A check that cannot be built; `field` is the option at fault, for the key path in the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


_REGISTRY: dict[str, tuple[type[CheckOptions], Callable[[Any], Check]]] = {}
_BUILTIN_MODULES = ("rules", "structured", "dedup", "verifier", "judge", "semantic")


def register(name: str, options: type[CheckOptions] = CheckOptions) -> Callable:
    """Class decorator: `@register("regex", RegexOptions)`; the class is built as `cls(options)`."""

    def wrap(factory: Callable[[Any], Check]) -> Callable[[Any], Check]:
        _REGISTRY[name] = (options, factory)
        return factory

    return wrap


def available() -> list[str]:
    for module in _BUILTIN_MODULES:  # importing them registers the built-in checks; each is light
        importlib.import_module(f"{__package__}.{module}")
    return sorted(_REGISTRY)


def _options_model(name: Any) -> type[CheckOptions]:
    known = available()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown check {name!r}; available: {', '.join(known)}")
    return _REGISTRY[name][0]


def parse_check_item(value: Any) -> str | CheckOptions:
    """Validate one item of `factory.checks`; a bare name stays a string so fingerprints stay as they were.

    A pydantic ValidationError raised here keeps its inner key paths (`pattern`), which pydantic prefixes
    with the item's position: `factory.checks.2.pattern`.
    """
    if isinstance(value, CheckOptions):
        return value
    if isinstance(value, str):
        model = _options_model(value)
        try:
            model.model_validate({"name": value})
        except ValidationError as exc:
            needed = sorted({str(e["loc"][0]) for e in exc.errors() if e["type"] == "missing" and e["loc"]})
            if not needed:
                raise ValueError(f"check {value!r} needs options: {exc.errors()[0]['msg']}") from None
            raise ValueError(
                f"check {value!r} needs options ({', '.join(needed)}): "
                f"write it as a mapping, e.g. {{name: {value}, {needed[0]}: ...}}"
            ) from None
        return value
    if isinstance(value, dict):
        if "name" not in value:
            raise ValueError(f"a check mapping needs `name:` (one of {', '.join(available())})")
        return _options_model(value["name"]).model_validate(value)
    raise ValueError("a check is a name such as `empty` or a mapping such as {name: regex, pattern: '...'}")


def check_options(item: str | CheckOptions) -> CheckOptions:
    if isinstance(item, CheckOptions):
        return item
    return _options_model(item).model_validate({"name": item})


def check_fingerprint(item: str | CheckOptions) -> str | dict[str, Any]:
    """What a check contributes to a run's fingerprint: the bare name when no option differs from its
    default (so `empty` and `{name: empty}` match, and runs made before options existed still resume),
    otherwise the non-default options (so adding an option with a default later changes nothing)."""
    if isinstance(item, str):
        return item
    data = item.fingerprint_data()
    data["name"] = item.name
    return item.name if set(data) == {"name"} else data


def duplicate_names(items: Iterable[str | CheckOptions | dict]) -> list[str]:
    seen: set[str] = set()
    twice: list[str] = []
    for item in items:
        name = check_options(parse_check_item(item)).check_name
        if name in seen and name not in twice:
            twice.append(name)
        seen.add(name)
    return twice


def build_checks(items: list[str | CheckOptions | dict], key: str = "factory.checks") -> list[Check | AsyncCheck]:
    """Build the checks in recipe order; every problem of every check is reported at once."""
    checks: list[Check | AsyncCheck] = []
    errors: list[str] = []
    for index, item in enumerate(items):
        try:
            options = check_options(parse_check_item(item))
        except (ValueError, ValidationError) as exc:
            errors.append(f"{key}.{index}: {exc}")
            continue
        try:
            check = _REGISTRY[options.name][1](options)
        except CheckConfigError as exc:
            where = f"{key}.{index}" + (f".{exc.field}" if exc.field else "")
            errors.append(f"{where}: {exc}")
            continue
        check.name = options.check_name
        checks.append(check)
    twice = duplicate_names(items) if not errors else []
    if twice:
        errors.append(f"{key}: two checks named {twice}; give one a `label:` so rejections say which")
    if errors:
        raise CheckConfigError("\n".join(errors) if len(errors) == 1 else "\n  " + "\n  ".join(errors))
    return checks


def prime(checks: list[Check], accepted: Path) -> int:
    """Feed the samples already accepted in a run directory to the run-wide checks (resume).

    Rebuilding from accepted.jsonl rather than persisting the indexes keeps one source of truth: the
    index can never disagree with the file after a crash. Returns how many samples were read.
    """
    from dataclasses import fields

    from factory.records import Sample

    run_wide = [check for check in checks if hasattr(check, "remember")]
    if not run_wide or not accepted.exists():
        return 0
    known = {f.name for f in fields(Sample)}  # a record written by a newer version may carry more keys
    count = 0
    with accepted.open("r", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            data = json.loads(line)
            sample = Sample.from_dict({key: value for key, value in data.items() if key in known})
            for check in run_wide:
                check.remember(sample)
            count += 1
    for check in run_wide:  # a check that batches its work (semantic_dup embeds) finishes it now
        if hasattr(check, "flush"):
            check.flush()
    return count
