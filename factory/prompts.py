"""Prompt files, and what every prompt source is handed. A JSONL line is {"id"?: str, "prompt": str | [messages], "attributes"?: {}, "reference"?: str}.

`reference` is the known answer, for the `reference` check; it is carried onto each Sample.

Prompts stream: `check_prompts` reads the file once to report every bad line (file:line and the fix)
before anything is paid, and `iter_prompts` reads it again as the run consumes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from apprentice.errors import ApprenticeError
from apprentice.hashing import canonical_json, stable_hash

if TYPE_CHECKING:
    from rich.console import Console

    from .asker import Asker

ROLES = {"system", "user", "assistant"}
MAX_REPORTED = 20


class PromptError(ApprenticeError):
    """Bad prompt lines; the message lists each with file:line."""


@dataclass
class SourceEnv:
    """What a prompt source gets besides its own settings. Every source has one signature,
    `async def write_prompts(config, env: SourceEnv) -> Path` (factory/sources.py lists them): it writes a
    prompts file (or names one) and returns its path."""

    run_dir: Path
    console: "Console"
    asker: "Asker | None" = None  # sources that ask the teacher (self-instruct) ask through the run's asker
    figures: dict[str, Any] | None = None  # what a source reports for the manifest


@dataclass(slots=True)
class PromptItem:
    id: str
    messages: list[dict[str, str]]
    attributes: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    reference: str | None = None


def parse_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt (a string, or a list of {"role", "content"} ending with the user) as chat messages;
    raises ValueError saying what is wrong. Golden sets (eval) read their prompts with it too."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError('"prompt" is empty')
        return [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and prompt):
        raise ValueError('"prompt" must be a non-empty string or a non-empty list of messages')
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'prompt[{i}] must be {{"role": ..., "content": ...}} and nothing else')
        if message["role"] not in ROLES:
            raise ValueError(f"prompt[{i}].role {message['role']!r} must be one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"prompt[{i}].content must be a string")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError("the last message of a prompt must have role 'user'")
    return messages


def _parse_line(raw: str, system: str | None) -> PromptItem:
    """Parse one line or raise ValueError saying what is wrong and how to fix it."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError('expected an object like {"prompt": "..."}')
    unknown = set(data) - {"id", "prompt", "attributes", "reference"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: id, prompt, attributes, reference")
    if "prompt" not in data:
        raise ValueError('missing "prompt" (a string, or a list of {"role", "content"} messages)')
    messages = parse_messages(data["prompt"])
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    prompt_id = data.get("id")
    if prompt_id is None:
        prompt_id = stable_hash(canonical_json(messages), length=16)
    elif not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool) or str(prompt_id) == "":
        raise ValueError('"id" must be a non-empty string or an integer')
    attributes = data.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError('"attributes" must be an object')
    reference = data.get("reference")
    if reference is not None:
        if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
            raise ValueError('"reference" must be a string (or a number)')
        reference = str(reference)
    return PromptItem(str(prompt_id), messages, attributes, reference=reference)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def check_prompts(path: Path, system: str | None = None) -> int:
    """Validate every line without keeping them; return the number of prompts or raise PromptError."""
    if not path.is_file():
        raise PromptError(f"{path}: prompts file not found (factory.prompts.path)")
    errors: list[str] = []
    count = 0
    seen: set[int] = set()
    try:
        for number, raw in _lines(path):
            try:
                item = _parse_line(raw, system)
            except ValueError as exc:
                errors.append(f"{path}:{number}: {exc}")
            else:
                key = hash(item.id)
                if key in seen:
                    errors.append(f"{path}:{number}: duplicate id {item.id!r}; ids must be unique")
                seen.add(key)
                count += 1
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if errors:
        shown = errors[:MAX_REPORTED]
        more = f"\n  … and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise PromptError(
            f"{len(errors)} bad prompt line(s); nothing was sent. Fix them and run again:\n  "
            + "\n  ".join(shown)
            + more
        )
    if count == 0:
        raise PromptError(f"{path}: no prompts in the file")
    return count


def iter_prompts(path: Path, system: str | None = None) -> Iterator[PromptItem]:
    for number, raw in _lines(path):
        item = _parse_line(raw, system)
        item.line = number
        yield item


def iter_prompt_lines(path: Path, system: str | None = None) -> Iterator[tuple[PromptItem, str]]:
    """Each prompt with its line as written: the Ray runner copies lines into shard files unchanged, so a
    prompt keeps its id (given, or the hash of its messages) in whichever file it is read from."""
    for number, raw in _lines(path):
        item = _parse_line(raw, system)
        item.line = number
        yield item, raw
