"""The served log: what `apprentice serve` answered, one JSONL line per request, and a prompt source reading it.

The router (serve/) writes it; `factory generate` reads it back (`prompts: {served: DIR, where: {answered_by:
student, confidence_below: -0.5}}`), so the teacher answers what the student found hard. Both sides meet here,
below the router, so the factory never imports the server.

Files: `served-000001.jsonl`, `served-000002.jsonl`, …: a file past the size limit is closed and the next
opened. Every line is one `write()` of a whole line to an unbuffered file, made before the client gets its
answer: a killed server loses no answered request, and leaves at most one partial last line, cut off by
`repair_tail` on the next start (the factory store's rule, factory/store.py).

A request's line, in the factory's record style (`prompt` and `completion` as chat messages):
`{"id", "time", "prompt", "completion", "answered_by": "student"|"teacher", "route", "confidence",
"student_confidence", "latency_ms", "usage", "finish_reason", "fault"}`; more choices (`n`) under `choices`.
A shadow comparison, written later off the response path: `{"id", "time", "shadow_of", "by", "completion",
"confidence", "agree", "latency_ms"}` (or `"error"` instead of an answer).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import orjson

from apprentice.hashing import canonical_json, stable_hash

from .prompt_config import ServedSource
from .prompts import PromptError, SourceEnv, parse_messages
from .store import repair_tail

SERVED_FILE = re.compile(r"^served-(\d{6})\.jsonl$")


def served_files(log_dir: Path) -> list[Path]:
    """The log's files, oldest first."""
    if not log_dir.is_dir():
        return []
    return sorted(path for path in log_dir.iterdir() if SERVED_FILE.match(path.name))


class ServedLog:
    """The writer: append a whole line, unbuffered, to the newest file; rotate by size."""

    def __init__(self, log_dir: Path, rotate_bytes: int) -> None:
        self.log_dir = log_dir
        self.rotate_bytes = rotate_bytes
        log_dir.mkdir(parents=True, exist_ok=True)
        files = served_files(log_dir)
        self.repaired = repair_tail(files[-1]) if files else 0
        self.number = int(SERVED_FILE.match(files[-1].name).group(1)) if files else 1  # type: ignore[union-attr]
        self._open()

    def _open(self) -> None:
        self.path = self.log_dir / f"served-{self.number:06d}.jsonl"
        self._file = open(self.path, "ab", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        """One whole line on disk (in the OS's hands: it survives a killed process) when this returns."""
        # orjson: this is on the response path, and cheaper than json.dumps
        data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        start = self._file.tell()
        try:
            written = self._file.write(data)
            while written < len(data):  # a raw write may take part of the bytes
                written += self._file.write(memoryview(data)[written:])
        except OSError:
            self._file.truncate(start)  # a line cut short (a full disk) is undone: every line stays whole
            raise
        if start + len(data) >= self.rotate_bytes:
            self._file.close()
            self.number += 1
            self._open()

    def close(self) -> None:
        self._file.close()


def iter_served(log_dir: Path) -> Iterator[dict[str, Any]]:
    """Every whole line of the log, oldest first (a torn last line of a killed server is skipped)."""
    for path in served_files(log_dir):
        with path.open("r", encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):
                    yield json.loads(line)


def matches(record: dict[str, Any], source: ServedSource) -> bool:
    where = source.where
    if "shadow_of" in record:
        return False
    if where.answered_by is not None and record.get("answered_by") != where.answered_by:
        return False
    if where.confidence_below is not None:
        confidence = record.get("student_confidence")
        if confidence is None or confidence >= where.confidence_below:
            return False
    if where.fault is not None and bool(record.get("fault")) != where.fault:
        return False
    return True


async def write_prompts(source: ServedSource, env: SourceEnv) -> Path:
    """The served prompts that match `where`, each conversation once, as a prompts file in the run directory
    (the prompt-source signature, factory/sources.py)."""
    if not served_files(source.dir):
        raise PromptError(f"factory.prompts.served: no served log in {source.dir} (served-*.jsonl); point it at "
                          "serve.log_dir of the server")
    env.run_dir.mkdir(parents=True, exist_ok=True)
    out = env.run_dir / "prompts.served.jsonl"
    seen: set[str] = set()
    counts = {"requests": 0, "matched": 0, "written": 0, "unusable": 0}
    with out.open("w", encoding="utf-8") as handle:
        for record in iter_served(source.dir):
            counts["requests"] += "shadow_of" not in record
            if not matches(record, source):
                continue
            counts["matched"] += 1
            try:
                messages = parse_messages(record.get("prompt"))
            except ValueError:  # a conversation that does not end with the user: nothing to answer
                counts["unusable"] += 1
                continue
            prompt_id = stable_hash(canonical_json(messages), length=16)
            if prompt_id in seen:
                continue
            seen.add(prompt_id)
            attributes = {"served_id": record["id"], "answered_by": record.get("answered_by")}
            if record.get("student_confidence") is not None:
                attributes["student_confidence"] = record["student_confidence"]
            handle.write(json.dumps({"id": prompt_id, "prompt": messages, "attributes": attributes},
                                    ensure_ascii=False) + "\n")
            counts["written"] += 1
            if source.limit is not None and counts["written"] >= source.limit:
                break
    env.figures = {"served": counts}
    if not counts["written"]:
        raise PromptError(f"factory.prompts.where: none of the {counts['requests']} served requests in {source.dir} "
                          "matches; loosen where (e.g. raise confidence_below)")
    return out
