"""Human review of a run: load it for pandas, promote rejected samples, demote accepted ones.

Decisions are appended to `review.jsonl` in the run directory ({id, action, reason, time}); the record
files are never rewritten, so a review can be read back, audited and undone (the last action on an id
wins). The trainer reads the same file: `sft.data.read_run` trains on `effective_ids`.

Only `load_run` needs pandas; the rest is light enough for the trainer and the CLI.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .store import ACCEPTED, REJECTED, iter_ids

if TYPE_CHECKING:
    import pandas as pd

REVIEW = "review.jsonl"
ACTIONS = ("promote", "demote")
MIN_PREFIX = 6


class ReviewError(Exception):
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


def _status_by_id(run_dir: Path) -> dict[str, str]:
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
        for record_id, status in _status_by_id(run_dir).items()
        if actions.get(record_id, "promote" if status == "accepted" else "demote") == "promote"
    }


def resolve_ids(run_dir: Path, ids: Iterable[str]) -> list[str]:
    """Full ids for the given ids or unique prefixes (at least 6 characters, as shown in `review`)."""
    known = _status_by_id(run_dir)
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


def _text(messages: Any, role: str | None = None) -> str:
    if not isinstance(messages, list):
        return ""
    return "\n".join(str(m.get("content") or "") for m in messages if role is None or m.get("role") == role)


def record_row(record: dict[str, Any], status: str) -> dict[str, Any]:
    """One record flattened for a table: the prompt's user turns, the completion, the failing check."""
    rejected_by = record.get("rejected_by")
    reason = None
    for check in record.get("checks") or []:
        if check.get("name") == rejected_by and not check.get("passed", True):
            reason = check.get("reason")
    usage = record.get("usage") or {}
    return {
        "id": record.get("id"),
        "status": status,
        "rejected_by": rejected_by,
        "reason": reason,
        "prompt": _text(record.get("prompt"), "user"),
        "system": _text(record.get("prompt"), "system") or None,
        "completion": _text(record.get("completion")),
        "finish_reason": record.get("finish_reason"),
        "prompt_id": record.get("prompt_id"),
        "sample_index": record.get("sample_index"),
        "reference": record.get("reference"),
        "output_tokens": usage.get("output_tokens"),
        "attributes": record.get("attributes") or {},
    }


def iter_records(run_dir: Path, name: str) -> Iterable[dict[str, Any]]:
    path = Path(run_dir) / name
    if not path.exists():
        return
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n") and line.strip():  # a torn last line is a write still in progress
                yield json.loads(line)


def load_run(run_dir: Path) -> "pd.DataFrame":
    """Accepted and rejected samples of a run as a DataFrame, with the review applied.

    Columns: id, status (the file it is in), review (last action or None), effective_status (after
    review), rejected_by, reason, prompt, system, completion, finish_reason, prompt_id, sample_index,
    reference, output_tokens, attributes (dict), and one `attr.<key>` column per attribute.
    """
    import pandas as pd

    _status_by_id(run_dir)  # a clear error for a path that is not a run
    actions = read_actions(run_dir)
    rows = [record_row(r, "accepted") for r in iter_records(run_dir, ACCEPTED)]
    rows += [record_row(r, "rejected") for r in iter_records(run_dir, REJECTED)]
    for row in rows:
        action = actions.get(row["id"])
        row["review"] = action
        row["effective_status"] = {"promote": "accepted", "demote": "rejected"}.get(action, row["status"])
        for key, value in row["attributes"].items():
            row[f"attr.{key}"] = value
    columns = ["id", "status", "review", "effective_status", "rejected_by", "reason", "prompt", "system",
               "completion", "finish_reason", "prompt_id", "sample_index", "reference", "output_tokens", "attributes"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    extra = sorted(c for c in frame.columns if c.startswith("attr."))
    return frame[columns + extra]


# ---- the terminal view (`python -m factory review`) ----------------------------------------------------


def show_counts(run_dir: Path, console) -> None:
    """Rejected samples by check and most common reason, and what review changed."""
    from rich.markup import escape
    from rich.table import Table

    from .stats import failing_reason, reason_template

    _status_by_id(run_dir)
    by_check: dict[str, dict[str, int]] = {}
    for record in iter_records(run_dir, REJECTED):
        reasons = by_check.setdefault(str(record.get("rejected_by")), {})
        template = reason_template(failing_reason(record))
        reasons[template] = reasons.get(template, 0) + 1
    table = Table(title=f"rejected samples in {escape(str(run_dir))}", title_justify="left")
    table.add_column("check")
    table.add_column("samples", justify="right")
    table.add_column("most common reasons")
    for name, reasons in sorted(by_check.items(), key=lambda kv: -sum(kv[1].values())):
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        table.add_row(escape(name), str(sum(reasons.values())), "\n".join(f"{n} × {escape(t)}" for t, n in top))
    console.print(table)
    actions = read_actions(run_dir)
    promoted = sum(1 for a in actions.values() if a == "promote")
    demoted = len(actions) - promoted
    if actions:
        console.print(f"review.jsonl: {promoted} promoted, {demoted} demoted")
    if by_check:
        first = escape(next(iter(sorted(by_check, key=lambda k: -sum(by_check[k].values())))))
        console.print(
            f"see them: python -m factory review {escape(str(run_dir))} --reason {first}\n"
            f"keep one: python -m factory review {escape(str(run_dir))} --promote ID --why \"...\"",
            highlight=False,
        )


def sample_panel(record: dict[str, Any], action: str | None = None):
    """A rich panel with the prompt, the completion and the failing check. Model text is escaped: an
    answer containing "[red]" or "[/]" must show as written, not restyle or break the terminal."""
    from rich.markup import escape
    from rich.panel import Panel

    row = record_row(record, "rejected" if record.get("rejected_by") else "accepted")
    lines = []
    if row["system"]:
        lines.append(f"[dim]system[/]\n[dim]{escape(row['system'])}[/]")
    lines.append(f"[bold cyan]prompt[/]\n{escape(row['prompt'])}")
    lines.append(f"[bold green]completion[/] [dim](finish_reason={escape(str(row['finish_reason']))})[/]\n"
                 f"{escape(row['completion'])}")
    if row["rejected_by"]:
        lines.append(f"[bold red]rejected by {escape(row['rejected_by'])}[/]: {escape(str(row['reason']))}")
    if action:
        lines.append(f"[yellow]review: {action}[/]")
    title = f"{escape(str(row['id']))} [dim]prompt {escape(str(row['prompt_id']))} #{row['sample_index']}[/]"
    return Panel("\n\n".join(lines), title=title, title_align="left")


def show_reason(run_dir: Path, name: str, console, *, limit: int | None = None, page_size: int = 5,
                interactive: bool = False) -> int:
    """Panels of the rejected samples of one check, a page at a time on a terminal; returns how many."""
    _status_by_id(run_dir)
    actions = read_actions(run_dir)
    shown = 0
    seen_names: set[str] = set()
    for record in iter_records(run_dir, REJECTED):
        seen_names.add(str(record.get("rejected_by")))
        if record.get("rejected_by") != name:
            continue
        if limit is not None and shown >= limit:
            break
        console.print(sample_panel(record, actions.get(str(record.get("id")))))
        shown += 1
        if interactive and shown % page_size == 0:
            answer = console.input("[dim]Enter: next page · q: quit[/] ")
            if answer.strip().lower().startswith("q"):
                break
    if shown == 0 and name not in seen_names:
        names = ", ".join(sorted(seen_names)) or "none"
        raise ReviewError(f"no sample in {run_dir} was rejected by {name!r}; checks that rejected: {names}")
    return shown
