"""The one record that flows through the factory, the trainer and the review tools.

A Sample is one line of accepted.jsonl or rejected.jsonl, in TRL's conversational prompt–completion
format (so `datasets.load_dataset("json", ...)` feeds SFTTrainer directly) plus its metadata.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from apprentice.hashing import stable_hash


def sample_id(prompt_id: str, sample_index: int, request_key: str) -> str:
    """Stable across runs: the same prompt, sample slot and teacher request give the same id."""
    return stable_hash(prompt_id, str(sample_index), request_key)


@dataclass(slots=True)
class CheckResult:
    name: str
    passed: bool
    reason: str | None = None
    score: float | None = None


@dataclass(slots=True)
class Sample:
    id: str
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    teacher: dict[str, Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    checks: list[CheckResult] = field(default_factory=list)
    rejected_by: str | None = None
    prompt_id: str | None = None
    sample_index: int = 0
    reference: str | None = None  # the prompt line's known answer, for the `reference` check

    @property
    def text(self) -> str:
        return self.completion[0]["content"] if self.completion else ""

    def to_json(self) -> str:
        # Shallow, field by field: dataclasses.asdict deep-copies every nested dict and list, which was the
        # largest share of the factory's own CPU per record in a profile of a 2,000-request run.
        data = {name: getattr(self, name) for name in _SAMPLE_FIELDS}
        data["checks"] = [{"name": c.name, "passed": c.passed, "reason": c.reason, "score": c.score} for c in self.checks]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sample":
        data = dict(data)
        data["checks"] = [CheckResult(**c) for c in data.get("checks", [])]
        return cls(**data)


_SAMPLE_FIELDS = tuple(f.name for f in fields(Sample))


@dataclass(slots=True)
class Failure:
    """A prompt × sample slot that got no answer after all retries: a record, not a stack trace."""

    id: str
    prompt_id: str
    sample_index: int
    prompt: list[dict[str, str]]
    error: str
    status: int | None
    attempts: int
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


# ---- reading a record line back (stats, review) -----------------------------------------------------------
_ID = re.compile(r"\b[0-9a-f]{12,}\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def failing_reason(record: dict[str, Any]) -> str | None:
    """The reason given by the check that rejected this record (a JSON line of rejected.jsonl)."""
    name = record.get("rejected_by")
    for check in record.get("checks") or []:
        if check.get("name") == name and not check.get("passed", True):
            return check.get("reason")
    return None


def reason_template(reason: str | None) -> str:
    """Group reason texts that differ only in ids and numbers ("near-duplicate of <id> (Jaccard ~N)")."""
    if not reason:
        return "(no reason)"
    return _NUMBER.sub("N", _ID.sub("<id>", reason))
