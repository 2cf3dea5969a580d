"""The eval report: results.json, report.md, a self-contained report.html (PNG plots inlined), a table.

The sections (eval/readings.py: a table and a one-line reading each) are built once and rendered here.
Model text is escaped everywhere it reaches HTML: answers, prompts, references, model names, lineage.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from .readings import Section, pareto_optimal, sections, table_rows


def print_table(summary: dict[str, Any], console: Any) -> None:
    """The overview table, each section's reading, the gate (model names escaped for rich's markup)."""
    from rich.markup import escape
    from rich.table import Table

    header, rows = table_rows(summary)
    table = Table(title=f"eval: {summary['items']} golden items", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console.print(table)
    for section in sections(summary):
        console.print(f"[bold]{section.title}:[/] {escape(section.reading)}", highlight=False)
    gate = summary.get("gate")
    if gate:
        colour = "green" if gate["passed"] else "red"
        console.print(f"[{colour}]gate {'passed' if gate['passed'] else 'FAILED'}:[/] {escape(str(gate['reason']))}",
                      highlight=False)


# ---- plots ------------------------------------------------------------------------------------------
def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(summary: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    names = list(summary["models"])
    means = [summary["models"][n]["metrics"]["overall"]["mean"] for n in names]
    lows = [m - summary["models"][n]["metrics"]["overall"]["low"] for n, m in zip(names, means)]
    highs = [summary["models"][n]["metrics"]["overall"]["high"] - m for n, m in zip(names, means)]
    lows, highs = ([0.0 if math.isnan(x) else x for x in side] for side in (lows, highs))  # no interval: no bar
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar(names, means, yerr=[lows, highs], capsize=6, color="#4C78A8")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("score (95 % CI)")
    axis.set_title("Golden-set score")
    out["scores"] = _png(figure)

    timed = {n: summary["models"][n]["perf"].get("latencies_s") for n in names}
    timed = {n: v for n, v in timed.items() if v}
    if timed:
        figure, axis = plt.subplots(figsize=(6, 3))
        axis.boxplot(list(timed.values()), tick_labels=list(timed))
        axis.set_ylabel("seconds per answer")
        axis.set_title("Latency, one prompt at a time")
        out["latency"] = _png(figure)

    panels = [(figure_key, label) for figure_key, label in (("latency_p50_s", "p50 latency (s, batch 1)"),
                                                             ("usd_per_1k_answers", "$ per 1k answers"))
              if sum(summary["models"][n]["perf"].get(figure_key) is not None for n in names) >= 2]
    if panels:
        figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), squeeze=False)
        for axis, (figure_key, label) in zip(axes[0], panels):
            best = set(pareto_optimal(summary, figure_key))
            for name in names:
                model = summary["models"][name]
                x = model["perf"].get(figure_key)
                if x is None:
                    continue
                y = model["metrics"]["overall"]["mean"]
                axis.scatter([x], [y], s=60, marker="*" if name in best else "o",
                             color="#E45756" if name in best else "#4C78A8")
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            if all(x > 0 for x in (summary["models"][n]["perf"].get(figure_key) for n in names) if x is not None):
                axis.set_xscale("log")  # a teacher 100× slower or dearer than its student
            axis.set_xlabel(label)
            axis.set_ylabel("score")
            axis.set_title("Pareto-optimal: red stars")
        out["frontier"] = _png(figure)

    if summary.get("cascade"):
        points = summary["cascade"]
        figure, axis = plt.subplots(figsize=(6, 3))
        axis.plot([100 * p["routed"] for p in points], [p["quality"] for p in points], marker="o")
        axis.set_xlabel("% of prompts routed to the teacher (least confident first)")
        axis.set_ylabel("score")
        axis.set_title("Cascade: student first, teacher below a confidence threshold")
        out["cascade"] = _png(figure)
    return out


# ---- markdown and HTML ------------------------------------------------------------------------------
def _md_cell(cell: str) -> str:
    # Entities rather than raw text: a Markdown viewer renders inline HTML, and cells hold model answers.
    return html.escape(cell, quote=False).replace("|", "\\|").replace("\n", " ")


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Eval report", "", f"{summary['items']} golden items from {', '.join(summary['golden'])}; "
             f"reference model: {summary['reference'] or '–'}; student: {summary['student']}."]
    gate = summary.get("gate")
    if gate:
        lines += ["", f"**Gate {'passed' if gate['passed'] else 'failed'}**: {_md_cell(gate['reason'])}"]
    for section in sections(summary):
        lines += ["", f"## {section.title}", "", f"**{_md_cell(section.reading)}**", "",
                  "| " + " | ".join(_md_cell(h) for h in section.header) + " |", "|" + "---|" * len(section.header)]
        lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in section.rows]
        lines += [""] + [_md_cell(note) for note in section.notes] if section.notes else []
        if section.key == "examples":
            for example in summary["examples"]:
                lines += ["", f"### {_md_cell(example['key'])}", "", f"Prompt: `{example['prompt']!r}`", ""]
                lines += [f"- **{_md_cell(name)}**: `{text!r}`" for name, text in example["answers"].items()]
                lines += [f"- reference: `{example['reference']!r}`"]
    return "\n".join(lines) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td{white-space:nowrap}td:first-child{white-space:normal}table{font-size:0.95em}
td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;margin:0}
.reading{font-size:1.05em;margin:0.4em 0}.note{color:#555;font-size:0.9em;margin:0.2em 0}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}img{max-width:100%}
td.text,th.text{text-align:left;white-space:normal;max-width:420px;overflow-wrap:anywhere}"""


def _html_section(section: Section, summary: dict[str, Any], images: dict[str, str]) -> list[str]:
    e = html.escape
    # Columns of free text (answers, references, lineage values) read left-aligned and may wrap.
    text_columns = {i for i in range(1, len(section.header)) if section.key in ("examples", "lineage")}
    parts = [f"<h2 id='{e(section.key)}'>{e(section.title)}</h2>", f"<p class='reading'>{e(section.reading)}</p>",
             "<table><tr>" + "".join(f"<th class='text'>{e(h)}</th>" if i in text_columns else f"<th>{e(h)}</th>"
                                     for i, h in enumerate(section.header)) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td class='text'>{e(c)}</td>" if i in text_columns else f"<td>{e(c)}</td>"
                               for i, c in enumerate(row)) + "</tr>" for row in section.rows]
    parts.append("</table>")
    parts += [f"<p class='note'>{e(note)}</p>" for note in section.notes]
    if section.key in images:
        parts.append(f"<img alt='{e(section.key)}' src='data:image/png;base64,{images[section.key]}'>")
    if section.key == "examples":
        for example in summary["examples"]:
            parts.append(f"<h3>{e(example['key'])}</h3><p>Prompt:</p><pre>{e(example['prompt'])}</pre><table>")
            for name, text in example["answers"].items():
                parts.append(f"<tr><th>{e(name)}</th><td class='text'><pre>{e(text)}</pre></td></tr>")
            parts.append(f"<tr><th>reference</th><td class='text'><pre>{e(str(example['reference']))}</pre></td></tr>"
                         "</table>")
    return parts


def render_html(summary: dict[str, Any], images: dict[str, str]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Apprentice eval report</title>",
             f"<style>{STYLE}</style></head><body><h1>Apprentice eval report</h1>",
             f"<p>{summary['items']} golden items from {e(', '.join(summary['golden']))}; reference model: "
             f"<b>{e(str(summary['reference']))}</b>; student: <b>{e(summary['student'])}</b>.</p>"]
    gate = summary.get("gate")
    if gate:
        css = "pass" if gate["passed"] else "fail"
        parts.append(f"<p class='{css}'>Gate {'passed' if gate['passed'] else 'failed'}: {e(gate['reason'])}</p>")
    for section in sections(summary):
        parts += _html_section(section, summary, images)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(output_dir: Path, summary: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    (output_dir / "report.md").write_text(markdown(summary), encoding="utf-8")
    images = plots(summary)
    for name, data in images.items():
        (output_dir / f"{name}.png").write_bytes(base64.b64decode(data))
    (output_dir / "report.html").write_text(render_html(summary, images), encoding="utf-8")
