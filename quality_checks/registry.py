"""The check registry: each check's name and options model, and how a recipe item is parsed.

This is what the config layer may import of the checks (factory/recipe.py validates `factory.checks` with
it): names and pydantic options models only. A check's behaviour is registered with it but lives in its
own module, imported when the checks are listed (`available()`), never by the config itself.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable

from pydantic import Field, ValidationError

from apprentice.config import Strict
from apprentice.errors import ApprenticeError


class CheckOptions(Strict):
    """Options every check takes. A check with options subclasses this and adds its own fields."""

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


class CheckConfigError(ApprenticeError, ValueError):
    """A check that cannot be built; `field` is the option at fault, for the key path in the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


_REGISTRY: dict[str, tuple[type[CheckOptions], Callable[[Any], Any]]] = {}
_BUILTIN_MODULES = ("rules", "structured", "dedup", "verifier", "judge", "semantic")


def register(name: str, options: type[CheckOptions] = CheckOptions) -> Callable:
    """Class decorator: `@register("regex", RegexOptions)`; the class is built as `cls(options)`."""

    def wrap(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _REGISTRY[name] = (options, factory)
        return factory

    return wrap


def available() -> list[str]:
    for module in _BUILTIN_MODULES:  # importing them registers the built-in checks; each is light
        importlib.import_module(f"quality_checks.{module}")
    return sorted(_REGISTRY)


def _options_model(name: Any) -> type[CheckOptions]:
    known = available()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown check {name!r}; available: {', '.join(known)}")
    return _REGISTRY[name][0]


def options_model(item: Any) -> type[CheckOptions] | None:
    """The options model of a recipe item (a name, or a mapping with `name:`), or None when it names no check."""
    name = item.get("name") if isinstance(item, dict) else item
    available()
    return _REGISTRY[name][0] if isinstance(name, str) and name in _REGISTRY else None


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


def build_check(options: CheckOptions) -> Any:
    """The check an options model describes (its module is imported by `available()`)."""
    return _REGISTRY[options.name][1](options)
