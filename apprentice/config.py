"""The config base every recipe section builds on: one strict pydantic base, one loader with `--set`,
one error format.

A recipe file holds `factory:`, `sft:`, `eval:` and `serve:` sections; each command validates its own section and
reports every problem of it at once, each with its key path as the recipe file spells it
(`factory.checks.2.pattern`). The section models live in factory/recipe.py, factory/prompt_config.py,
sft/config.py, eval/config.py and serve/config.py, which import no behaviour module.
"""
from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RecipeError

SECTIONS = ("factory", "sft", "eval", "serve")
Section = TypeVar("Section", bound=BaseModel)


class Strict(BaseModel):
    """A recipe model: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def item_model(cls, field: str, item: Any) -> type[BaseModel] | None:
        """The model of one item of `field` when its type does not say (a check's options depend on its
        name); for the "did you mean" of an unknown key. None: not known."""
        return None


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


def _models_in(annotation: Any) -> list[Any]:
    """The types an annotation may hold: `X | None`, `list[X]`, `dict[str, X]` and `Annotated[X, ...]` opened."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [found for arg in typing.get_args(annotation) for found in _models_in(arg)]
    return [annotation]


def _is_any(annotation: Any) -> bool:
    return all(kind is Any for kind in _models_in(annotation))


def closest_key(model: type[BaseModel], data: Any, loc: tuple[str | int, ...]) -> str | None:
    """The known key nearest to the unknown one at the end of `loc` (difflib's ratio), or None.

    Walks the models along `loc` beside the raw `data`: a field's annotation, a list's items, a mapping's
    values; an item typed Any (a check) is asked of its owner's `item_model`."""
    # (annotation here, the model that declared the field we are in, that field's name)
    here: list[tuple[Any, Any, str]] = [(model, None, "")]
    for part in loc[:-1]:
        value = data[part] if _has(data, part) else None
        down: list[tuple[Any, Any, str]] = []
        for annotation, owner, field in here:
            for kind in _models_in(annotation):
                origin, args = typing.get_origin(kind), typing.get_args(kind)
                if isinstance(kind, type) and issubclass(kind, BaseModel) and part in kind.model_fields:
                    down.append((kind.model_fields[part].annotation, kind, str(part)))
                elif isinstance(part, int) and origin in (list, tuple) and args:
                    item = args[0]
                    if _is_any(item) and isinstance(owner, type) and issubclass(owner, Strict):
                        item = owner.item_model(field, value) or item
                    down.append((item, owner, field))
                elif isinstance(part, str) and origin is dict and len(args) == 2:
                    down.append((args[1], owner, field))
        here, data = down, value
    known = sorted({name for annotation, _, _ in here for kind in _models_in(annotation)
                    if isinstance(kind, type) and issubclass(kind, BaseModel) for name in kind.model_fields})
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return close[0] if close else None


def _has(data: Any, part: str | int) -> bool:
    if isinstance(data, dict):
        return part in data
    return isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)


def format_validation_error(path: Path | str, error: ValidationError, model: type[BaseModel] | None = None,
                            data: Any = None, section: str | None = None) -> str:
    """Every error of a recipe section, each with its key path; an unknown key with the known key nearest to
    it when `model` (the section's, whose raw mapping is `data`) has one. `section` prefixes the key paths."""
    lines = [f"{path}: {error.error_count()} problem(s) in the recipe:"]
    for item in error.errors():
        loc = ".".join(str(part) for part in ((section,) if section else ()) + tuple(item["loc"])) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            close = closest_key(model, data, tuple(item["loc"])) if model is not None else None
            msg = (f"unknown key; did you mean `{close}`?" if close else
                   "unknown key (check the spelling; docs/generate.md, training.md, eval.md and serve.md list the keys of each section)")
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
        raise RecipeError(format_validation_error(path, exc, model, value, section)) from None


def load_section(model: type[Section], section: str, path: Path | str,
                 overrides: list[str] | None = None) -> Section:
    """The validated `section:` of a recipe file: the one loader every command uses."""
    data = load_recipe_data(path, overrides)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        hints = [f"{name} (did you mean `{close[0]}`?)" if (close := difflib.get_close_matches(str(name), SECTIONS, n=1))
                 else str(name) for name in unknown]
        raise RecipeError(f"{path}: unknown top-level section(s) {', '.join(hints)}; expected {', '.join(SECTIONS)}")
    if data.get(section) is None:
        raise RecipeError(f"{path}: no `{section}:` section; add one (see data/recipes/demo.yaml)")
    return validate_section(model, section, data[section], path)
