"""The config base every recipe section builds on: one strict pydantic base, one loader with `--set`,
one error format.

A recipe file holds `factory:`, `sft:` and `eval:` sections; each command validates its own section and
reports every problem of it at once, each with its key path as the recipe file spells it
(`factory.checks.2.pattern`). The section models live in factory/recipe.py, factory/prompt_config.py,
sft/config.py and eval/config.py, which import no behaviour module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RecipeError

SECTIONS = ("factory", "sft", "eval")
Section = TypeVar("Section", bound=BaseModel)


class Strict(BaseModel):
    """A recipe model: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


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
    """The recipe file as a mapping, after `--set dotted.key=value` overrides."""
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


def validate_section(model: type[Section], section: str, value: Any, path: Path | str = "<recipe>") -> Section:
    """One section of a recipe validated by its model; every error at once, with `section.` key paths."""
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: `{section}:` must be a mapping of keys (see data/recipes/demo.yaml)")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(path, with_section_prefix(exc, section))) from None


def load_section(model: type[Section], section: str, path: Path | str,
                 overrides: list[str] | None = None) -> Section:
    """The validated `section:` of a recipe file: the one loader every command uses."""
    data = load_recipe_data(path, overrides)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"{path}: unknown top-level section(s) {', '.join(unknown)}; expected factory, sft, eval")
    if data.get(section) is None:
        raise RecipeError(f"{path}: no `{section}:` section; add one (see data/recipes/demo.yaml)")
    return validate_section(model, section, data[section], path)
