"""The review ledger: promote/demote decisions on the samples of a run, kept in `review.jsonl`.

Decisions are appended to `review.jsonl` in the run directory ({id, action, reason, time}); the record
files are never rewritten, so a review can be read back, audited and undone (the last action on an id
wins). `factory review` writes it, `factory stats` counts it and `sft.data.read_run` trains on what it
decides (`effective_ids`). Storage only: it reads the record files' ids and nothing above the store.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from apprentice.errors import ApprenticeError

from .store import ACCEPTED, REJECTED, iter_ids

REVIEW = "review.jsonl"
ACTIONS = ("promote", "demote")
MIN_PREFIX = 6


class ReviewError(ApprenticeError):
    """A review request that cannot be applied; nothing was written."""


def read_actions(run_dir: Path) -> dict[str, str]:
    """id → the last review action on it ("promote" or "demote")."""
    path = Path(run_dir) / REVIEW
    actions: dict[str, str] = {}
    if not path.exists():
        return actions
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                record_id, action = str(item["id"]), item["action"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if not line.endswith("\n"):
                    break  # a torn last line: the write that made it did not finish
                raise ReviewError(f"{path}:{number}: not a review line ({{id, action, reason, time}})") from None
            if action not in ACTIONS:
                raise ReviewError(f"{path}:{number}: action {action!r} is not one of {ACTIONS}")
            actions[record_id] = action
    return actions


def status_by_id(run_dir: Path) -> dict[str, str]:
    """id → "accepted" or "rejected", the file each sample of the run is in; a clear error for a non-run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReviewError(f"{run_dir}: run directory not found")
    if not (run_dir / ACCEPTED).exists() and not (run_dir / REJECTED).exists():
        raise ReviewError(f"{run_dir}: no accepted.jsonl or rejected.jsonl; run `python -m factory generate` first")
    status = {record_id: "accepted" for record_id in iter_ids(run_dir / ACCEPTED)}
    status.update((record_id, "rejected") for record_id in iter_ids(run_dir / REJECTED))
    return status


def effective_ids(run_dir: Path) -> set[str]:
    """Ids that count as accepted after review: accepted ones not demoted, plus promoted rejected ones."""
    actions = read_actions(run_dir)
    return {
        record_id
        for record_id, status in status_by_id(run_dir).items()
        if actions.get(record_id, "promote" if status == "accepted" else "demote") == "promote"
    }


def resolve_ids(run_dir: Path, ids: Iterable[str]) -> list[str]:
    """Full ids for the given ids or unique prefixes (at least 6 characters, as shown in `review`)."""
    known = status_by_id(run_dir)
    resolved: list[str] = []
    problems: list[str] = []
    for given in ids:
        given = given.strip()
        if given in known:
            resolved.append(given)
            continue
        matches = [k for k in known if k.startswith(given)] if len(given) >= MIN_PREFIX else []
        if len(matches) == 1:
            resolved.append(matches[0])
        elif len(matches) > 1:
            problems.append(f"{given} (matches {len(matches)} samples; give more characters)")
        else:
            problems.append(given)
    if problems:
        raise ReviewError(f"{run_dir}: unknown sample id(s): {', '.join(problems)}; nothing was written")
    return resolved


def _append(run_dir: Path, ids: Iterable[str], action: str, why: str) -> list[str]:
    if not why or not why.strip():
        raise ReviewError("say why (--why TEXT): the reason is kept with the decision; nothing was written")
    resolved = resolve_ids(run_dir, ids)
    if not resolved:
        raise ReviewError("no sample ids given; nothing was written")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = "".join(
        json.dumps({"id": record_id, "action": action, "reason": why.strip(), "time": now}, ensure_ascii=False) + "\n"
        for record_id in dict.fromkeys(resolved)
    )
    with open(Path(run_dir) / REVIEW, "ab") as handle:  # one append of whole lines, like the record files
        handle.write(lines.encode("utf-8"))
    return list(dict.fromkeys(resolved))


def promote(run_dir: Path, ids: Iterable[str], why: str) -> list[str]:
    """Count these samples as accepted (train on them); returns the full ids written."""
    return _append(run_dir, ids, "promote", why)


def demote(run_dir: Path, ids: Iterable[str], why: str) -> list[str]:
    """Count these samples as rejected (never train on them); returns the full ids written."""
    return _append(run_dir, ids, "demote", why)


def reviewed_records(run_dir: Path, *, rejected: bool = False) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """The records on one side of a run as review left it, with (file, line) for messages: accepted minus
    demoted plus promoted (or, `rejected`, the other side). Each has a string `id` and its `prompt` and
    `completion` as plain {role, content} lists. A line that is no such record raises ReviewError naming
    file:line; a torn last line (a run still writing, or killed) ends its file, as the store would cut it."""
    run_dir = Path(run_dir)
    actions = read_actions(run_dir)
    # (file, whether a record of it is on this side when review left it alone, the action that moves it)
    if rejected:
        sources = [(run_dir / REJECTED, True, "promote"), (run_dir / ACCEPTED, False, "demote")]
    else:
        sources = [(run_dir / ACCEPTED, True, "demote"), (run_dir / REJECTED, False, "promote")]
    for path, kept, flip in sources:
        if not path.is_file() or (not kept and flip not in actions.values()):
            continue
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if not line.endswith("\n"):
                        break
                    raise ReviewError(f"{path}:{number}: not valid JSON: {exc}") from None
                if kept == (actions.get(str(record.get("id"))) == flip):
                    continue  # on this side, but moved by review (or on the other side, not moved)
                if not isinstance(record.get("prompt"), list) or not isinstance(record.get("completion"), list):
                    raise ReviewError(f"{path}:{number}: expected conversational `prompt` and `completion` lists")
                record["id"] = str(record.get("id", f"{run_dir.name}:{number}"))
                record["prompt"] = [_message(m) for m in record["prompt"]]
                record["completion"] = [_message(m) for m in record["completion"]]
                yield path, number, record


def _message(message: dict[str, Any]) -> dict[str, str]:
    return {"role": str(message["role"]), "content": str(message.get("content") or "")}

