"""The eval report's sections, each a table and a one-line reading, built once from the summary that
results.json holds; eval/report.py renders them as Markdown, as HTML and (the first) in the terminal.

Scores and retention read as percent everywhere (results.json keeps fractions and ratios); each
interval says which method made it. Cells are plain text: the renderers escape them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METHOD_NAMES = {"wilson": "Wilson", "bca": "BCa bootstrap", "paired bca": "paired BCa bootstrap",
                "percentile": "percentile bootstrap", "paired percentile": "paired percentile bootstrap",
                "mover wilson": "MOVER-R of Wilson intervals", "none": "–"}


@dataclass
class Section:
    key: str  # the HTML anchor, and the name of its plot when it has one
    title: str
    reading: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(value: Any) -> str:
    return "–" if _missing(value) else f"{100 * value:.1f} %"


def num(value: Any, digits: int = 3) -> str:
    if _missing(value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def with_interval(value: Any, low: Any, high: Any) -> str:
    """80.0 % [69.6, 87.5]: the value and its 95 % interval, in percent."""
    if _missing(value):
        return "–"
    if _missing(low) or _missing(high):
        return pct(value)
    return f"{pct(value)} [{100 * low:.1f}, {100 * high:.1f}]"


def method_name(entry: dict[str, Any]) -> str:
    return METHOD_NAMES.get(entry.get("interval", "none"), str(entry.get("interval")))


def _seconds(value: Any) -> str:
    return "–" if _missing(value) else f"{value:.2f} s"


def _size(num_bytes: Any) -> str:
    return "–" if not num_bytes else f"{num_bytes / 2**20:.0f} MiB"


def _times(ratio: Any) -> str:
    """A ratio against the reference: 4.2×, 0.031× (three significant digits)."""
    return "–" if _missing(ratio) else f"{ratio:.3g}×"


def _params(count: Any) -> str:
    return "–" if not count else f"{count / 1e6:.0f} M"


def _label(summary: dict[str, Any], name: str) -> str:
    role = summary["models"][name].get("role")
    return name + (f" ({role})" if role else "")


def _methods(entries: list[dict[str, Any]]) -> str:
    return ", ".join(sorted({method_name(e) for e in entries if e.get("interval") not in (None, "none")})) or "–"


# ---- scores --------------------------------------------------------------------------------------------
def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The overview, one row a model: the report's first table and the terminal's."""
    header = ["model", "score (95 % CI)", "retention (95 % CI)", "agreement", "p50 latency", "speed-up", "tokens/s",
              "params", "on disk", "$/1k", "cost ratio"]
    rows = []
    for name, model in summary["models"].items():
        overall = model["metrics"]["overall"]
        perf = model["perf"]
        retention = model.get("retention", {}).get("overall")
        rows.append([
            _label(summary, name),
            with_interval(overall["mean"], overall["low"], overall["high"]),
            with_interval(retention["ratio"], retention["low"], retention["high"]) if retention
            else ("reference" if name == summary["reference"] else "–"),
            pct(model.get("agreement")),
            _seconds(perf.get("latency_p50_s")),
            _times((model.get("frontier") or {}).get("speedup")),
            num(perf.get("output_tokens_per_s"), 1),
            _params(perf.get("parameters")),
            _size(perf.get("disk_bytes")),
            num(perf.get("usd_per_1k_answers"), 4),
            _times((model.get("frontier") or {}).get("cost_ratio")),
        ])
    return header, rows


def scores(summary: dict[str, Any]) -> Section:
    header, rows = table_rows(summary)
    student, reference = summary["student"], summary["reference"]
    model = summary["models"][student]
    overall = model["metrics"]["overall"]
    reading = f"{student} scores {with_interval(overall['mean'], overall['low'], overall['high'])}"
    retention = model.get("retention", {}).get("overall")
    if retention:
        ref = summary["models"][reference]["metrics"]["overall"]["mean"]
        reading += (f", keeping {with_interval(retention['ratio'], retention['low'], retention['high'])} "
                    f"of {reference}'s {pct(ref)}")
    elif reference is None:
        reading += "; no reference model, so no retention"
    gate = summary.get("gate")
    if gate:
        reading += f"; gate {'passed' if gate['passed'] else 'failed'}"
    models = summary["models"].values()
    retentions = [m["retention"]["overall"] for m in models if m.get("retention", {}).get("overall")]
    notes = [f"Score: the mean over {summary['items']} golden items of each item's mean metric; 95 % intervals: "
             f"{_methods([m['metrics']['overall'] for m in models])}."]
    if retentions:
        notes.append(f"Retention: a model's score ÷ {reference}'s, items paired; 95 % intervals: {_methods(retentions)}"
                     f" ({summary.get('bootstrap_resamples', '–')} resamples). Agreement: the same answer as "
                     f"{reference} after normalisation.")
    return Section("scores", "Scores", reading + ".", header, rows, notes)


def by_metric(summary: dict[str, Any]) -> Section:
    header = ["model", "metric", "mean (95 % CI)", "interval", "retention (95 % CI)", "interval"]
    rows = []
    for name, model in summary["models"].items():
        for metric, value in model["metrics"].items():
            retention = model.get("retention", {}).get(metric)
            rows.append([name, metric, with_interval(value["mean"], value["low"], value["high"]), method_name(value),
                         with_interval(retention["ratio"], retention["low"], retention["high"]) if retention else "–",
                         method_name(retention) if retention else "–"])
    student = summary["student"]
    metrics = {m: v for m, v in summary["models"][student]["metrics"].items() if m != "overall"}
    if len(metrics) == 1:
        reading = f"{next(iter(metrics))} is the only metric: overall is the same figure"
    else:
        ranked = sorted(metrics, key=lambda m: metrics[m]["mean"])
        reading = (f"{student} is weakest on {ranked[0]} ({pct(metrics[ranked[0]]['mean'])}) and strongest on "
                   f"{ranked[-1]} ({pct(metrics[ranked[-1]]['mean'])})")
    notes = ["Wilson: every value 0 or 1 (a proportion; 0 of n is [0, 3.84/(n + 3.84)], never [0, 0]). BCa bootstrap: "
             "graded values. Paired: student and reference resampled item by item. MOVER-R: a pass/fail ratio whose "
             "resamples all agree (a student with none right), from the two Wilson intervals."]
    return Section("metrics", "By metric", reading + ".", header, rows, notes)


def by_tag(summary: dict[str, Any]) -> Section | None:
    names = list(summary["models"])
    tags = sorted({tag for m in summary["models"].values() for tag in m.get("tags", {})})
    if len(tags) < 2:
        return None  # one tag is the golden set itself: the overview says it all
    student = summary["student"]
    retention = summary["models"][student].get("retention_by_tag", {})
    header = ["tag", *names] + ([f"{student} retention"] if retention else [])
    rows = [[tag, *[pct(summary["models"][n]["tags"].get(tag)) for n in names]]
            + ([pct(retention.get(tag))] if retention else []) for tag in tags]
    own = summary["models"][student]["tags"]
    weakest = min(tags, key=lambda t: own[t])
    reading = f"{student} is weakest on tag {weakest} ({pct(own[weakest])}"
    reading += f", retention {pct(retention.get(weakest))})" if retention else ")"
    return Section("tags", "By tag", reading + ".", header, rows, ["Mean score of the items with the tag (no interval)."])


# ---- speed and cost ------------------------------------------------------------------------------------
def perf(summary: dict[str, Any]) -> Section | None:
    models = summary["models"]
    if not any(m["perf"] for m in models.values()):
        return None
    header = ["model", "p50 latency", "p99 latency", "speed-up", "first token p50", "tokens/s", "answers/s (batch)",
              "params", "on disk", "RSS added by load", "$/1k answers", "cost ratio"]
    rows = [[_label(summary, n), _seconds(p.get("latency_p50_s")), _seconds(p.get("latency_p99_s")),
             _times((m.get("frontier") or {}).get("speedup")),
             _seconds(p.get("ttft_p50_s")), num(p.get("output_tokens_per_s"), 1),
             "–" if not p.get("answers_per_s") else f"{p['answers_per_s']:.2f} ({p.get('batch_size', p.get('concurrency'))})",
             _params(p.get("parameters")),
             _size(p.get("disk_bytes")), "–" if p.get("loaded_mib") is None else f"{p['loaded_mib']:.0f} MiB",
             num(p.get("usd_per_1k_answers"), 4), _times((m.get("frontier") or {}).get("cost_ratio"))]
            for n, m in models.items() for p in (m["perf"],)]
    student, reference = summary["student"], summary["reference"]
    mine, theirs = models[student]["perf"], (models[reference]["perf"] if reference else {})
    if mine.get("latency_p50_s") and theirs.get("latency_p50_s"):
        ratio = mine["latency_p50_s"] / theirs["latency_p50_s"]
        reading = (f"{student} answers in {_seconds(mine['latency_p50_s'])} at p50, {ratio:.2f}× the time "
                   f"{reference} takes ({_seconds(theirs['latency_p50_s'])})")
        if mine.get("parameters") and mine.get("parameters") == theirs.get("parameters"):
            reading += "; the same size, so any difference comes from the prompt (the teacher's context) and the answer"
    elif mine.get("latency_p50_s"):
        reading = f"{student} answers in {_seconds(mine['latency_p50_s'])} at p50"
    elif mine.get("usd_per_1k_answers") is not None:
        reading = f"{student} costs ${num(mine['usd_per_1k_answers'], 4)} per 1,000 answers"
    else:
        reading = "hosted models are priced, not timed"
    found = models[student].get("frontier") or {}
    if found.get("speedup") or found.get("cost_ratio"):
        reading += "; against " + reference + ": " + ", ".join(part for part in (
            f"{found['speedup']:.3g}× the speed" if found.get("speedup") else "",
            f"{found['cost_ratio']:.3g}× the cost per answer" if found.get("cost_ratio") else "") if part)
    timed = mine.get("timed_prompts")
    notes = [f"Latency: {timed} prompts one at a time, as a user waits for them. RSS added by load: the process's "
             "growth while loading, so a model loaded after another of the same base reuses memory and adds less."
             if timed else "Hosted models: cost from the usage of each answer and the price table.",
             "Speed-up: the reference's p50 latency ÷ the model's, one prompt at a time (hosted models timed with "
             "eval.timed_requests, past the cache). Cost ratio: the model's $ per 1k answers ÷ the reference's; a "
             "local model's is eval.cost's hourly price over its answers per hour at its batch size, a served model's "
             "(a base_url, no price) the same over its answers per hour at eval.served_concurrency requests at once."]
    return Section("latency", "Latency and size", reading + ".", header, rows, notes)


def pareto_optimal(summary: dict[str, Any], figure: str) -> list[str]:
    """The models no other model beats on both quality (higher) and `figure` (a perf key; lower), among
    those that have the figure."""
    points = {name: (m["metrics"]["overall"]["mean"], m["perf"].get(figure)) for name, m in summary["models"].items()}
    points = {name: point for name, point in points.items() if not _missing(point[1])}
    return [name for name, (score, cost) in points.items()
            if not any(s >= score and c <= cost and (s > score or c < cost) for s, c in points.values())]


def frontier(summary: dict[str, Any]) -> Section | None:
    """Quality against latency and against cost, with the Pareto-optimal models named."""
    models = summary["models"]
    fast, cheap = pareto_optimal(summary, "latency_p50_s"), pareto_optimal(summary, "usd_per_1k_answers")
    timed = [n for n, m in models.items() if not _missing(m["perf"].get("latency_p50_s"))]
    priced = [n for n, m in models.items() if not _missing(m["perf"].get("usd_per_1k_answers"))]
    if len(timed) < 2 and len(priced) < 2:
        return None
    header = ["model", "score", "p50 latency", "speed-up", "$/1k answers", "cost ratio", "Pareto-optimal on"]
    rows = []
    for name, model in models.items():
        found = model.get("frontier") or {}
        on = [label for label, members in (("latency", fast), ("cost", cheap)) if name in members]
        rows.append([_label(summary, name), pct(model["metrics"]["overall"]["mean"]),
                     _seconds(model["perf"].get("latency_p50_s")), _times(found.get("speedup")),
                     num(model["perf"].get("usd_per_1k_answers"), 4), _times(found.get("cost_ratio")),
                     " and ".join(on) or "–"])
    parts = []
    if len(timed) >= 2:
        parts.append(f"on quality × latency: {', '.join(fast)}")
    if len(priced) >= 2:
        parts.append(f"on quality × cost: {', '.join(cheap)}")
    notes = ["A model is Pareto-optimal when no other model scores at least as well and is at least as fast (or "
             "cheap), better on one of the two; the others are dominated. Models without the figure are left out."]
    return Section("frontier", "Quality, latency and cost", "Pareto-optimal " + "; ".join(parts) + ".", header, rows,
                   notes)


def regression(summary: dict[str, Any]) -> Section | None:
    """What the student forgot: each model on the general sets, and its change against the base model."""
    found = summary.get("regression")
    if not found:
        return None
    base, student = found["base"], summary["student"]
    header = ["model", "regression-set score (95 % CI)", f"change vs {base}" if base else "change"]
    rows = [[_label(summary, name), with_interval(m["mean"], m["low"], m["high"]),
             "base" if name == base else ("–" if m["change"] is None else f"{100 * m['change']:+.1f} points")]
            for name, m in found["models"].items()]
    mine = found["models"].get(student)
    if mine is None or mine["change"] is None:
        reading = f"{student} scores {pct(mine['mean']) if mine else '–'} on the regression sets; no base model to compare"
    elif mine["change"] < 0:
        reading = (f"{student} lost {100 * -mine['change']:.1f} points on the regression sets against {base} "
                   f"({pct(found['models'][base]['mean'])} → {pct(mine['mean'])})")
    else:
        reading = (f"{student} kept what {base} could do on the regression sets ({pct(found['models'][base]['mean'])} "
                   f"→ {pct(mine['mean'])})")
    notes = [f"The regression sets ({', '.join(found['sets'])}) are general, not the task: instructions checked by "
             "code (word counts, keywords, casing, JSON keys, bullets), each answer right only if it meets every "
             "constraint. Their score is not part of the task's score."]
    return Section("regression", "What the student forgot", reading + ".", header, rows, notes)


def fidelity(summary: dict[str, Any]) -> Section | None:
    """Distillation fidelity: each model against the teacher's answers on the student's sft held-out split."""
    found = summary.get("fidelity")
    if not found:
        return None
    student = summary["student"]
    rows = [[_label(summary, name), with_interval(m["mean"], m["low"], m["high"])] for name, m in found["models"].items()]
    mine = found["models"][student]
    reading = (f"{student} agrees with the teacher's own answers on {pct(mine['mean'])} of {found['items']} "
               "held-out training prompts it never saw")
    notes = ["The student's sft held-out split, rebuilt from its lineage.json: the teacher's accepted answers, scored "
             "with the task's metrics (the reference is the teacher's answer). Not part of the task's score."]
    return Section("fidelity", "Fidelity on the held-out teacher data", reading + ".",
                   ["model", "score against the teacher's answers (95 % CI)"], rows, notes)


def cascade(summary: dict[str, Any]) -> Section | None:
    points = summary.get("cascade")
    if not points:
        return None
    rows = [[pct(p["routed"]), num(p.get("threshold")), pct(p["quality"])] for p in points]
    base, best = points[0]["quality"], max(points, key=lambda p: (p["quality"], -p["routed"]))
    reference = summary["reference"]
    if best["quality"] > base:
        reading = (f"routing the {pct(best['routed'])} least confident answers of {summary['student']} to {reference} "
                   f"lifts the score from {pct(base)} to {pct(best['quality'])}")
    else:
        reading = (f"routing to {reference} does not help: {summary['student']} alone scores {pct(base)}, "
                   f"{reference} alone {pct(points[-1]['quality'])}")
    return Section("cascade", "Cascade", reading + ".", ["routed to the reference", "below confidence", "score"], rows,
                   ["The student answers; answers with a mean token logprob below the threshold go to the reference."])


# ---- against the teacher -------------------------------------------------------------------------------
def pairwise(summary: dict[str, Any]) -> Section | None:
    pair = summary.get("pairwise")
    if not pair:
        return None
    rows = [[pair["student"], pair["against"], with_interval(pair["win_rate"], pair["low"], pair["high"]),
             method_name(pair), str(pair["inconsistent_pairs"]), str(pair["unparsed"]), f"${pair['cost_usd']:.4f}"]]
    verdict = "wins more often than it loses" if pair["low"] > 0.5 else (
        "loses more often than it wins" if pair["high"] < 0.5 else "is level with it (the interval holds 50 %)")
    reading = (f"{pair['student']} against {pair['against']}: win rate {pct(pair['win_rate'])}, so it {verdict}; "
               f"{pair['inconsistent_pairs']} of {summary['items']} pairs changed verdict with the order (ties)")
    return Section("pairwise", "Pairwise judge", reading + ".",
                   ["student", "against", "win rate (95 % CI)", "interval", "order-inconsistent", "unparsed",
                    "judge cost"], rows, ["Each pair is judged in both orders; a tie counts half."])


def speculative(summary: dict[str, Any]) -> Section | None:
    spec = summary.get("speculative")
    if not spec:
        return None
    student, reference = summary["student"], summary["reference"]
    speedup, accepted = spec.get("speedup"), spec.get("acceptance_rate")
    rows = [[str(spec["prompts"]), pct(accepted), _seconds(spec.get("teacher_alone_s")),
             _seconds(spec.get("with_draft_s")), "–" if _missing(speedup) else f"{speedup:.2f}×"]]
    draft = summary["models"][student]["perf"].get("parameters")
    target = summary["models"][reference]["perf"].get("parameters") if reference else None
    # A draft model does a forward pass per drafted token: only one much smaller than the target saves work.
    large = bool(draft and target and draft >= target / 2)
    size = f"the draft model ({_params(draft)} parameters) is as large as the target ({_params(target)})"
    if _missing(speedup):
        reading = "not measured"
    elif speedup >= 1.05 and not large:
        reading = f"{speedup:.2f}× — faster: {reference} accepts {pct(accepted)} of {student}'s drafted tokens"
    elif speedup >= 1.05:
        reading = (f"{speedup:.2f}× — faster on this run, but {size}, so drafting cannot save work: read the gain "
                   f"as timing noise ({spec['prompts']} prompts, timed once)")
    elif speedup > 0.95:
        reading = f"{speedup:.2f}× — no gain: " + (f"{size}; it pays off only with a much smaller draft" if large
                                                  else "drafting costs about what it saves")
    elif large:
        reading = f"{speedup:.2f}× — slower: {size}; it pays off only with a much smaller draft"
    else:
        reading = (f"{speedup:.2f}× — slower: only {pct(accepted)} of the drafted tokens are accepted, too few to pay "
                   "for drafting them")
    return Section("speculative", "Speculative decoding", reading + ".",
                   ["prompts", "draft tokens accepted", "teacher alone", "with the draft", "speed-up"], rows,
                   [f"{student} drafts, {reference} verifies: greedy assisted generation (transformers); speed-up = "
                    "teacher alone ÷ teacher with the draft."])


def divergence(summary: dict[str, Any]) -> Section | None:
    kl = summary.get("divergence_kl")
    if kl is None:
        return None
    rows = [[summary["reference"], summary["student"], "–" if _missing(kl) else f"{kl:.3f} nats"]]
    reading = (f"{summary['student']}'s next-token distribution is {num(kl)} nats per token from "
               f"{summary['reference']}'s along the teacher's own answers (0 would be the same distribution)")
    return Section("divergence", "Divergence", reading + ".", ["teacher", "student", "mean KL(teacher ‖ student)"], rows,
                   ["Each model sees the prompt as it would in use: the teacher with its context, the student without."])


def examples(summary: dict[str, Any]) -> Section | None:
    chosen = summary.get("examples")
    if not chosen:
        return None
    student, reference = summary["student"], summary["reference"]
    rows = [[e["key"], pct(e["gap"]), e["answers"].get(student, ""), str(e["reference"])] for e in chosen]
    behind = f"behind {reference}" if reference else "lowest"
    reading = f"the {len(chosen)} golden item(s) where {student} falls furthest {behind}; every answer below"
    return Section("examples", "Where the student falls furthest behind", reading + ".",
                   ["item", "score gap", f"{student} answered", "reference"], rows)


def lineage(summary: dict[str, Any]) -> Section | None:
    found = {n: m["lineage"] for n, m in summary["models"].items() if m.get("lineage")}
    if not found:
        return None
    fields: list[tuple[str, Any]] = [
        ("base model", lambda g: (g.get("base_model") or {}).get("name")),
        ("data", lambda g: "; ".join(f"{r.get('path')} ({r.get('samples')} samples)" for r in g.get("data") or [])),
        ("train / held out", lambda g: "{train} / {eval} (seed {seed})".format(**g["splits"]) if g.get("splits") else None),
        ("steps", lambda g: g.get("global_step")),
        ("held-out loss", lambda g: num((g.get("metrics") or {}).get("eval_loss"))),
        ("LoRA", lambda g: _lora((g.get("sft") or {}).get("lora"))),
        ("learning rate, epochs", lambda g: "{learning_rate}, {epochs}".format(**g["sft"]) if g.get("sft") else None),
        ("distillation", lambda g: _distill((g.get("sft") or {}).get("distill"))),
        ("device", lambda g: (g.get("hardware") or {}).get("device")),
        ("git commit", lambda g: g.get("git_commit")),
        ("trained at", lambda g: g.get("started_at")),
        ("training time", lambda g: None if g.get("seconds") is None else f"{g['seconds']:.0f} s"),
    ]
    rows = [[label, *[_text(get(g)) for g in found.values()]] for label, get in fields]
    first_name, first = next(iter(found.items()))
    adapter = _lora((first.get("sft") or {}).get("lora")) or "a full fine-tune"
    reading = (f"{first_name} is {adapter} on {_text((first.get('base_model') or {}).get('name'))}, "
               f"{_text(first.get('global_step'))} steps on {_text((first.get('splits') or {}).get('train'))} samples "
               f"from {len(first.get('data') or [])} factory run(s), held-out loss "
               f"{num((first.get('metrics') or {}).get('eval_loss'))}")
    return Section("lineage", "Lineage", reading + ".", ["", *found], rows, ["From lineage.json beside the model."])


def _lora(lora: Any) -> str | None:
    return None if not lora else f"LoRA r{lora.get('r')} alpha {lora.get('alpha')}"


def _distill(distill: Any) -> str:
    return "none (SFT on the samples)" if not distill else ", ".join(f"{k} {v}" for k, v in distill.items())


def _text(value: Any) -> str:
    return "–" if value is None or value == "" else str(value)


def spend(summary: dict[str, Any]) -> Section | None:
    """What this eval paid, by model and part, and in all."""
    found = summary.get("spend") or {}
    parts, total = found.get("parts") or [], found.get("total") or {}
    if not total.get("requests") and not total.get("cost_usd"):
        return None  # local models only, or every answer from the cache
    header = ["model", "part", "requests", "input tokens", "output tokens", "cost"]
    rows = [[p["model"], p["part"], str(p["requests"]), str(p["input_tokens"]), str(p["output_tokens"]),
             f"${p['cost_usd']:.4f}"] for p in parts]
    rows.append(["all", "", str(total["requests"]), str(total["input_tokens"]), str(total["output_tokens"]),
                 f"${total['cost_usd']:.4f}"])
    paid_again = sum(p["cost_usd"] for p in parts if p["part"] in ("timed requests", "throughput requests"))
    reading = f"this eval spent ${total['cost_usd']:.4f} on {total['requests']} request(s)"
    if paid_again:
        reading += f", ${paid_again:.4f} of it on timed and throughput requests"
    return Section("spend", "What this eval spent", reading + ".", header, rows,
                   ["Answers and verdicts the cache held cost nothing again; timed requests (eval.timed_requests) and "
                    "throughput requests (eval.served_concurrency) go past the cache, so every eval pays for them."])


def sections(summary: dict[str, Any]) -> list[Section]:
    found = [scores(summary), by_metric(summary), by_tag(summary), regression(summary), fidelity(summary), perf(summary),
             frontier(summary), cascade(summary), pairwise(summary), speculative(summary), divergence(summary),
             spend(summary), examples(summary), lineage(summary)]
    return [section for section in found if section is not None]
