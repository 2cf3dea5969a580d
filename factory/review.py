"""Human review of a run: a pandas table of it, and the terminal view of `python -m factory review`.

The decisions themselves (promote a rejected sample, demote an accepted one) live in the review ledger,
factory/review_ledger.py; this module shows the samples with the ledger applied.

Only `load_run` needs pandas.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .records import failing_reason, reason_template
from .review_ledger import ReviewError, read_actions, status_by_id
from .store import ACCEPTED, REJECTED

if TYPE_CHECKING:
    import pandas as pd


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

    status_by_id(run_dir)  # a clear error for a path that is not a run
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

    status_by_id(run_dir)
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
    status_by_id(run_dir)
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
