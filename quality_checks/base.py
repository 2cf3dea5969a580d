"""What a check is: the Verdict it returns, the capabilities it declares, and how a recipe's checks are built.

A recipe lists checks in order, each either a bare name (`empty`) or a mapping with options
(`{name: regex, pattern: "...", mode: must_not_match}`), validated by the registry (quality_checks/registry.py)
with every problem reported at once. Things that need the file system or an import (a schema file, a golden
set, a verifier function) are checked when the checks are built, before anything is sent, and all at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import ValidationError

from factory.records import Sample

from .registry import CheckConfigError, CheckOptions, build_check, check_options, duplicate_names, parse_check_item

if TYPE_CHECKING:
    from factory.asker import Asker
    from factory.recipe import TeacherConfig


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str | None = None
    score: float | None = None


PASS = Verdict(True)


class Check:
    """A check, with the capabilities the engine reads declared as class attributes (never probed):

    - `awaits`: the check waits on I/O (an LLM judge, a batch of embeddings) and implements `averdict`
      instead of `__call__`; the engine awaits it in its place in recipe order, so put it after the cheap ones.
    - `run_wide`: the check has memory across the run (dedup): the engine calls `remember` for every accepted
      sample, and for every sample already in accepted.jsonl when a run resumes, then `flush` once.
    - `teacher`: the model a check asks (a TeacherConfig), or None. Such a check is handed the run's way of
      asking (limiter, cache, budget) through `connect` before the first sample.
    """

    name: str
    awaits: ClassVar[bool] = False
    run_wide: ClassVar[bool] = False
    teacher: "TeacherConfig | None" = None

    def __call__(self, sample: Sample) -> Verdict:
        raise NotImplementedError(f"{type(self).__name__} awaits: the engine calls averdict")

    async def averdict(self, sample: Sample) -> Verdict:
        return self(sample)

    def remember(self, sample: Sample) -> None:
        """A run-wide check adds an accepted sample to its memory."""

    def flush(self) -> None:
        """A run-wide check that batches its work (semantic_dup embeds) finishes it."""

    def connect(self, asker: "Asker") -> None:
        """A check with a `teacher` gets the run's asker for it."""


def build_checks(items: list[str | CheckOptions | dict], key: str = "factory.checks") -> list[Check]:
    """Build the checks in recipe order; every problem of every check is reported at once."""
    checks: list[Check] = []
    errors: list[str] = []
    for index, item in enumerate(items):
        try:
            options = check_options(parse_check_item(item))
        except (ValueError, ValidationError) as exc:
            errors.append(f"{key}.{index}: {exc}")
            continue
        try:
            check = build_check(options)
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
    run_wide = [check for check in checks if check.run_wide]
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
        check.flush()
    return count
