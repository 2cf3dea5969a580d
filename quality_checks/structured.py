"""Checks against a structure or a known answer: `json` (parse, optional JSON Schema) and `reference`."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field

from apprentice.text import fold_answer

from .base import PASS, Check, Verdict
from .registry import CheckConfigError, CheckOptions, register

if TYPE_CHECKING:
    from factory.records import Sample

# A fenced block, ```json or a bare ```; models wrap JSON in one even when told not to.
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)


def extract_json_text(text: str) -> str:
    match = _FENCE.search(text)
    return match.group(1) if match else text.strip()


class JsonOptions(CheckOptions):
    schema_: dict[str, Any] | str | None = Field(
        default=None,
        alias="schema",
        description="a JSON Schema as a mapping, or the path of a .json file holding one",
    )

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)  # `schema` would shadow BaseModel.schema


@register("json", JsonOptions)
class Json(Check):
    """The answer must parse as JSON (a ```json fenced block is allowed) and, given a schema, validate.

    The reason names the failing location as a JSON path ($.items[0].price) and jsonschema's message.
    """

    name = "json"

    def __init__(self, options: JsonOptions) -> None:
        self.validator = None
        schema = options.schema_
        if schema is None:
            return
        if isinstance(schema, str):
            path = Path(schema)
            if not path.is_file():
                raise CheckConfigError(f"schema file {path} not found (relative paths start in the current directory)", "schema")
            try:
                schema = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckConfigError(f"{path}: not valid JSON: {exc}", "schema") from None
        from jsonschema import exceptions, validators

        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except exceptions.SchemaError as exc:
            raise CheckConfigError(f"not a valid JSON Schema: {exc.message}", "schema") from None
        self.validator = cls(schema)

    def __call__(self, sample: "Sample") -> Verdict:
        text = extract_json_text(sample.text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return Verdict(False, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        if self.validator is not None:
            from jsonschema.exceptions import best_match

            error = best_match(self.validator.iter_errors(data))
            if error is not None:
                return Verdict(False, f"schema: {error.json_path}: {error.message[:200]}")
        return PASS


class ReferenceOptions(CheckOptions):
    mode: Literal["exact", "normalized", "contains", "number", "json"] = "normalized"
    missing: Literal["pass", "reject"] = Field(
        default="reject", description="what to do with a sample whose prompt line has no reference"
    )
    tolerance: float = Field(default=1e-6, ge=0, description="mode number: relative and absolute tolerance")


# Numbers as people and models write them: -1,234.5  3.0e8  −7 (unicode minus)
_NUMBER = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+\u2212]?\.\d+")


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


@register("reference", ReferenceOptions)
class Reference(Check):
    """Compare the answer with the `reference` of its prompt line.

    exact: equal after stripping whitespace; normalized: equal after `apprentice.text.fold_answer`
    (NFKC, casefold, punctuation deleted, articles dropped: eval's `normalized` metric, the same rule);
    contains: the normalized reference appears as whole words in the normalized answer; number: the last number in the answer equals the reference number (the
    convention of GSM8K-style "... so the answer is 42"); json: the answer (or its ```json block) parses
    to the same JSON value as the reference, so key order and spacing do not matter.
    """

    name = "reference"

    def __init__(self, options: ReferenceOptions) -> None:
        self.mode = options.mode
        self.reject_missing = options.missing == "reject"
        self.tolerance = options.tolerance

    def __call__(self, sample: "Sample") -> Verdict:
        reference = sample.reference
        if reference is None:
            if self.reject_missing:
                return Verdict(False, "no reference on the prompt line (add one, or set missing: pass)")
            return PASS
        answer = sample.text
        if self.mode == "exact":
            ok = answer.strip() == reference.strip()
        elif self.mode == "normalized":
            ok = fold_answer(answer) == fold_answer(reference)
        elif self.mode == "contains":
            ok = f" {fold_answer(reference)} " in f" {fold_answer(answer)} "
        elif self.mode == "json":
            try:
                expected = json.loads(reference)
            except ValueError:
                return Verdict(False, f"reference {reference[:40]!r} is not JSON (mode: json)")
            try:
                ok = json.loads(extract_json_text(answer)) == expected
            except ValueError:
                return Verdict(False, "answer is not JSON (mode: json)")
        else:
            expected = parse_number(reference.strip())
            if expected is None:
                return Verdict(False, f"reference {reference[:40]!r} is not a number (mode: number)")
            got = last_number(answer)
            if got is None:
                return Verdict(False, f"no number in the answer; reference {reference[:40]}")
            if not math.isclose(got, expected, rel_tol=self.tolerance, abs_tol=self.tolerance):
                return Verdict(False, f"number {got:g} != reference {expected:g}")
            return Verdict(True, score=1.0)
        if not ok:
            return Verdict(False, f"answer differs from the reference ({self.mode}): {reference[:60]!r}")
        return Verdict(True, score=1.0)
