"""The eval report: results.json, report.md, a self-contained report.html (PNG plots inlined), a table.

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

from rich.markup import escape


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _size(num_bytes: Any) -> str:
    return "–" if not num_bytes else f"{num_bytes / 2**20:.0f} MiB"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "score (95 % CI)", "retention", "agreement", "p50 latency", "tokens/s", "params", "on disk", "$/1k"]
    rows = []
    for name, model in summary["models"].items():
        overall = model["metrics"]["overall"]
        perf = model["perf"]
        retention = model.get("retention", {}).get("overall", {})
        rows.append([
            name + (f" ({model['role']})" if model.get("role") else ""),
            f"{_pct(overall['mean'])} [{_pct(overall['low'])}, {_pct(overall['high'])}]",
            f"{_pct(retention.get('ratio'))}" if retention else ("reference" if name == summary["reference"] else "–"),
            _pct(model.get("agreement")),
            f"{perf['latency_p50_s']:.2f} s" if perf.get("latency_p50_s") is not None else "–",
            _num(perf.get("output_tokens_per_s"), 1),
            f"{perf['parameters'] / 1e6:.0f} M" if perf.get("parameters") else "–",
            _size(perf.get("disk_bytes")),
            _num(perf.get("usd_per_1k_answers"), 4),
        ])
    return header, rows


def print_table(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    header, rows = table_rows(summary)
    table = Table(title=f"eval: {summary['items']} golden items", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console.print(table)
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
def markdown(summary: dict[str, Any]) -> str:
    header, rows = table_rows(summary)
    lines = [f"# Eval report", "", f"{summary['items']} golden items from {', '.join(summary['golden'])}; "
             f"reference model: {summary['reference'] or '–'}; student: {summary['student']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    gate = summary.get("gate")
    if gate:
        lines += ["", f"**Gate {'passed' if gate['passed'] else 'failed'}**: {gate['reason']}"]
    lines += ["", "## By metric", "", "| model | metric | mean | 95 % CI | retention |", "|---|---|---|---|---|"]
    for name, model in summary["models"].items():
        for metric, value in model["metrics"].items():
            retention = model.get("retention", {}).get(metric, {}).get("ratio")
            lines.append(f"| {name} | {metric} | {_pct(value['mean'])} | [{_pct(value['low'])}, {_pct(value['high'])}] "
                         f"| {_pct(retention)} |")
    for key, title in (("pairwise", "Pairwise judge"), ("speculative", "Speculative decoding (student drafts)")):
        if summary.get(key):
            lines += ["", f"## {title}", "", "```json", json.dumps(summary[key], indent=2), "```"]
    if summary.get("divergence_kl") is not None:
        lines += ["", f"Mean per-token KL(teacher ‖ student) on the teacher's answers: {_num(summary['divergence_kl'])} nats"]
    if summary.get("cascade"):
        lines += ["", "## Cascade", "", "| routed to teacher | score |", "|---|---|"]
        lines += [f"| {_pct(p['routed'])} | {_pct(p['quality'])} |" for p in summary["cascade"]]
    if summary.get("examples"):
        lines += ["", "## Where the student falls furthest behind", ""]
        for example in summary["examples"]:
            lines += [f"### {example['key']}", "", f"Prompt: {example['prompt']}", ""]
            lines += [f"- **{name}**: `{text!r}`" for name, text in example["answers"].items()]
            lines += [f"- reference: `{example['reference']!r}`", ""]
    return "\n".join(lines) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}img{max-width:100%}"""


def render_html(summary: dict[str, Any], images: dict[str, str]) -> str:
    e = html.escape
    header, rows = table_rows(summary)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Apprentice eval report</title>",
             f"<style>{STYLE}</style></head><body><h1>Apprentice eval report</h1>",
             f"<p>{summary['items']} golden items from {e(', '.join(summary['golden']))}; reference model: "
             f"<b>{e(str(summary['reference']))}</b>; student: <b>{e(summary['student'])}</b>.</p>"]
    gate = summary.get("gate")
    if gate:
        css = "pass" if gate["passed"] else "fail"
        parts.append(f"<p class='{css}'>Gate {'passed' if gate['passed'] else 'failed'}: {e(gate['reason'])}</p>")
    parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</table>")
    for key, title in (("scores", "Scores"), ("latency", "Latency"), ("cascade", "Cascade")):
        if key in images:
            parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{images[key]}'>")
    for key, title in (("pairwise", "Pairwise judge"), ("speculative", "Speculative decoding (student drafts)")):
        if summary.get(key):
            parts.append(f"<h2>{title}</h2><pre>{e(json.dumps(summary[key], indent=2))}</pre>")
    if summary.get("divergence_kl") is not None:
        parts.append(f"<p>Mean per-token KL(teacher ‖ student) on the teacher's answers: "
                     f"{e(_num(summary['divergence_kl']))} nats</p>")
    if summary.get("examples"):
        parts.append("<h2>Where the student falls furthest behind</h2>")
        for example in summary["examples"]:
            parts.append(f"<h3>{e(example['key'])}</h3><p>Prompt:</p><pre>{e(example['prompt'])}</pre><table>")
            for name, text in example["answers"].items():
                parts.append(f"<tr><th>{e(name)}</th><td style='text-align:left'><pre>{e(text)}</pre></td></tr>")
            parts.append(f"<tr><th>reference</th><td style='text-align:left'><pre>{e(str(example['reference']))}</pre></td></tr></table>")
    lineage = {n: m["lineage"] for n, m in summary["models"].items() if m.get("lineage")}
    if lineage:
        parts.append(f"<h2>Lineage</h2><pre>{e(json.dumps(lineage, indent=2, default=str))}</pre>")
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
