"""`eval run`: answer, score, compare with the reference model, gate, report."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from apprentice.errors import RecipeError
from factory.answers import SPENT_KEYS
from factory.lock import DirectoryLock
from factory.pricing import usd
from sft.lineage import files_content, lineage_path_for, record_eval

from . import distill
from .answer import ModelRun, local_cost, machine_cost, run_hosted, run_local, served_throughput, time_hosted
from .config import EvalConfig
from .fidelity import held_out_items
from .report import write_reports
from .golden import GoldenItem, load_golden
from .judge import JudgeResult, run_judge
from .metrics import INTERVAL_METHODS, METRICS, as_score, load_function, mean_interval, ratio_interval


@dataclass
class Gate:
    passed: bool
    reason: str


def score_runs(config: EvalConfig, items: list[GoldenItem], runs: dict[str, ModelRun],
               judged: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """model → metric → item key → score in [0, 1]; `overall` is the mean of an item's metrics."""
    verifier = None
    if any("verifier" in item.metrics for item in items):
        if not config.verifier:
            raise RecipeError("a golden item asks for metric `verifier`: set eval.verifier to package.module:function")
        verifier = load_function(config.verifier, "eval.verifier")
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for name, run in runs.items():
        table: dict[str, dict[str, float]] = {"overall": {}}
        for item in items:
            answer = run.answers[item.key].text
            values = []
            for metric in item.metrics + (["judge"] if name in judged else []):
                if metric == "verifier":
                    value = as_score(verifier(answer, item))  # type: ignore[misc]
                elif metric == "judge":
                    value = judged.get(name, {}).get(item.key, 0.0)
                else:
                    value = METRICS[metric](answer, item.reference)
                table.setdefault(metric, {})[item.key] = value
                values.append(value)
            table["overall"][item.key] = sum(values) / len(values)
        scores[name] = table
    return scores


# results.json keeps fractions and ratios; the reports and the terminal print both as percent.
UNITS = {
    "metrics": "mean score, a fraction in [0, 1], with its 95 % interval [low, high]",
    "retention": "ratio: the student's mean score ÷ the reference model's (1.0 = 100 %), with its 95 % interval",
    "retention_by_tag": "ratio, as retention, per tag (no interval)",
    "interval": INTERVAL_METHODS,
}


def summarize(config: EvalConfig, items: list[GoldenItem], runs: dict[str, ModelRun],
              scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    keys = [item.key for item in items]
    tags = sorted({tag for item in items for tag in item.tags} | {item.set for item in items})
    tagged = {tag: [i.key for i in items if tag in i.tags or tag == i.set] for tag in tags}

    def tag_means(overall: dict[str, float]) -> dict[str, float]:
        return {tag: sum(overall[k] for k in members) / len(members) for tag, members in tagged.items()}

    reference = config.reference_name()
    out: dict[str, Any] = {"models": {}, "reference": reference, "student": config.student_name(), "units": UNITS,
                           "bootstrap_resamples": config.bootstrap}
    for name, table in scores.items():
        model: dict[str, Any] = {"metrics": {}, "perf": runs[name].perf,
                                 "provider": runs[name].config.provider, "model": runs[name].config.model,
                                 "role": runs[name].config.role, "lineage": runs[name].lineage}
        for metric, values in table.items():
            mean, low, high, method = mean_interval([values[k] for k in keys if k in values],
                                                    resamples=config.bootstrap, seed=config.seed)
            model["metrics"][metric] = {"mean": mean, "low": low, "high": high, "n": len(values), "interval": method}
        model["tags"] = tag_means(table["overall"])
        if reference and name != reference and reference in scores:
            ref = scores[reference]
            model["retention"] = {}
            for metric in table:
                if metric in ref:
                    common = [k for k in keys if k in table[metric] and k in ref[metric]]
                    ratio, low, high, method = ratio_interval([table[metric][k] for k in common],
                                                              [ref[metric][k] for k in common],
                                                              resamples=config.bootstrap, seed=config.seed)
                    model["retention"][metric] = {"ratio": ratio, "low": low, "high": high, "interval": method}
            ref_tags = tag_means(ref["overall"])
            model["retention_by_tag"] = {tag: model["tags"][tag] / ref_tags[tag] if ref_tags[tag] else float("nan")
                                         for tag in tags}
            model["agreement"] = distill.agreement(runs[name], runs[reference], keys)
            model["frontier"] = frontier(runs[name].perf, runs[reference].perf)
        out["models"][name] = model
    return out


def set_means(config: EvalConfig, items: list[GoldenItem],
              scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Each model's mean overall score on a set scored apart from the task's, with its interval."""
    models: dict[str, dict[str, Any]] = {}
    for name, table in scores.items():
        mean, low, high, method = mean_interval([table["overall"][i.key] for i in items], resamples=config.bootstrap,
                                                seed=config.seed)
        models[name] = {"mean": mean, "low": low, "high": high, "n": len(items), "interval": method}
    return models


def regression_summary(config: EvalConfig, items: list[GoldenItem],
                       scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Each model's score on the general sets, and its change against the base model's (what it forgot)."""
    base = config.base_name()
    models = set_means(config, items, scores)
    for name, model in models.items():
        model["change"] = model["mean"] - models[base]["mean"] if base in models else None
    return {"sets": [str(p) for p in config.regression], "base": base, "models": models}


def frontier(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """Speed-up (the reference's p50 latency ÷ this model's, both at batch 1) and cost ratio (this model's
    $ per 1k answers ÷ the reference's); None where either side was not timed or priced."""
    def ratio(top: Any, bottom: Any) -> float | None:
        return top / bottom if top is not None and bottom else None

    return {"speedup": ratio(theirs.get("latency_p50_s"), mine.get("latency_p50_s")),
            "cost_ratio": ratio(mine.get("usd_per_1k_answers"), theirs.get("usd_per_1k_answers"))}


def _frontier_reasons(gate: Any, model: dict[str, Any]) -> list[str]:
    reasons = []
    found = model.get("frontier") or {}
    if gate.min_speedup is not None:
        speedup = found.get("speedup")
        if speedup is None:
            reasons.append("speed-up undefined (a model without latency: local models are timed with "
                           "eval.perf_prompts, hosted ones with eval.timed_requests)")
        elif speedup < gate.min_speedup:
            reasons.append(f"speed-up {speedup:.2f}× < min_speedup {gate.min_speedup:g}×")
    if gate.max_cost_ratio is not None:
        cost_ratio = found.get("cost_ratio")
        if cost_ratio is None:
            reasons.append("cost ratio undefined (a model without $ per 1k answers: set eval.cost for local models, "
                           "eval.cost and eval.served_concurrency for served ones, a price for hosted ones)")
        elif cost_ratio > gate.max_cost_ratio:
            reasons.append(f"cost ratio {cost_ratio:.3g} > max_cost_ratio {gate.max_cost_ratio:g}")
    if gate.max_latency_p99_s is not None:
        p99 = model["perf"].get("latency_p99_s")
        if p99 is None:
            reasons.append("p99 latency unmeasured (eval.perf_prompts or eval.timed_requests is 0)")
        elif p99 > gate.max_latency_p99_s:
            reasons.append(f"p99 latency {p99:.3f} s > max_latency_p99_s {gate.max_latency_p99_s:g} s")
    return reasons


def eval_figures(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The eval as tracker scalars (each model's metrics with their intervals, retention, the gate) and texts."""
    scalars: dict[str, float] = {}
    for name, model in summary["models"].items():
        for metric, value in model["metrics"].items():
            scalars[f"eval/{name}/{metric}"] = value["mean"]
            if metric == "overall":
                scalars[f"eval/{name}/overall_low"], scalars[f"eval/{name}/overall_high"] = value["low"], value["high"]
        retention = (model.get("retention") or {}).get("overall")
        if retention:
            scalars.update({f"eval/{name}/retention": retention["ratio"], f"eval/{name}/retention_low": retention["low"],
                            f"eval/{name}/retention_high": retention["high"]})
    texts = {}
    if summary.get("gate") is not None:
        scalars["eval/gate_passed"] = 1.0 if summary["gate"]["passed"] else 0.0
        texts["eval/gate"] = summary["gate"]["reason"]
    return scalars, texts


def check_gate(config: EvalConfig, summary: dict[str, Any]) -> Gate | None:
    gate = config.gate
    if gate is None:
        return None
    student = summary["student"]
    model = summary["models"][student]
    reasons = []
    retention = model.get("retention", {}).get("overall", {}).get("ratio")
    if summary["reference"] is None:
        reasons.append("no reference model (set eval.reference or give one model role: teacher)")
    elif retention is None or math.isnan(retention):
        reasons.append("retention undefined (the reference scored 0)")
    elif retention < gate.min_retention:
        reasons.append(f"retention {_percent(retention, gate.min_retention)} < min_retention {_percent(gate.min_retention)}")
    score = model["metrics"]["overall"]["mean"]
    if gate.min_score is not None and score < gate.min_score:
        reasons.append(f"score {_percent(score, gate.min_score)} < min_score {_percent(gate.min_score)}")
    reasons += _frontier_reasons(gate, model)
    if gate.max_regression is not None:
        found = (summary.get("regression") or {}).get("models", {}).get(student)
        if found is None:
            reasons.append("no regression score (set eval.regression, e.g. [data/golden/instructions.jsonl])")
        elif found["change"] is None:
            reasons.append("regression undefined (no base model: set eval.base or give one model role: baseline)")
        elif -found["change"] > gate.max_regression:
            reasons.append(f"lost {100 * -found['change']:.1f} points on the regression sets > max_regression "
                           f"{100 * gate.max_regression:g}")
    if reasons:
        return Gate(False, f"{student}: " + "; ".join(reasons))
    found = model.get("frontier") or {}
    extra = "".join([f", speed-up {found['speedup']:.2f}× ≥ {gate.min_speedup:g}×" if gate.min_speedup else "",
                     f", cost ratio {found['cost_ratio']:.3g} ≤ {gate.max_cost_ratio:g}" if gate.max_cost_ratio else "",
                     f", p99 {model['perf']['latency_p99_s']:.3f} s ≤ {gate.max_latency_p99_s:g} s"
                     if gate.max_latency_p99_s else ""])
    return Gate(True, f"{student}: retention {_percent(retention, gate.min_retention)} ≥ min_retention "
                      f"{_percent(gate.min_retention)}{extra}")


def _percent(fraction: float, limit: float | None = None) -> str:
    """0.9 → "90 %", 1.125 → "112.5 %" (retention reads as percent everywhere); with a limit, enough
    digits that the two differ: 0.8996 against 0.9 is "89.96 %", not "90.0 %"."""
    digits = 1
    while limit is not None and fraction != limit and round(100 * fraction, digits) == round(100 * limit, digits) \
            and digits < 6:
        digits += 1
    text = f"{100 * fraction:.{digits}f}"
    return (text.removesuffix(".0") if limit is None else text) + " %"


def _default_params(config: EvalConfig) -> None:
    for model in config.models:
        if "params" not in model.model_fields_set:
            model.params = dict(config.params)


def measure_hosted(config: EvalConfig, run: ModelRun, items: list[GoldenItem], console: Any) -> None:
    """A hosted or served model's timing pass (eval.timed_requests, one at a time) and, on a server of one's
    own (a base_url), its throughput pass (eval.served_concurrency at once), both past the cache: their
    figures go to its perf, what they used to its spend. Without a price, a served model's $ per 1k answers
    is eval.cost's hourly price over the throughput measured, as for a local model."""
    model = run.config
    if model.base_url is not None and model.price is None and not run.perf.get("cost_usd"):
        # A server of one's own prices no token: the machine is what costs, unknown until its throughput is measured
        # (not $0, which would pass any max_cost_ratio).
        run.perf["usd_per_1k_answers"] = None
    if config.timed_requests:
        console.print(escape(f"{model.name}: timing {min(config.timed_requests, len(items))} request(s) "
                             "one at a time, past the cache"), highlight=False)
        perf, sent = time_hosted(model, items, config.timed_requests)
        run.perf.update(perf)
        run.spent["timed requests"] = sent.spent()
    if not config.served_concurrency or model.base_url is None:
        return
    count = max(len(items), config.served_concurrency)
    console.print(escape(f"{model.name}: throughput of {count} request(s), {config.served_concurrency} at once, "
                         "past the cache"), highlight=False)
    perf, sent = served_throughput(model, items, config.served_concurrency)
    run.perf.update(perf)
    run.spent["throughput requests"] = sent.spent()
    hour_usd = config.cost.gpu_hour_usd if config.cost.served_on == "gpu" else config.cost.cpu_hour_usd
    cost = machine_cost(run.perf, hour_usd) if model.price is None else None
    if cost is not None:
        run.perf.update(usd_per_1k_answers=cost, priced_by=f"eval.cost.{config.cost.served_on}_hour_usd")


def spend(runs: dict[str, ModelRun], judge: JudgeResult | None) -> dict[str, Any]:
    """What this eval paid, by model and part (answers, the judge's verdicts, timed and throughput requests),
    and in all: answers the cache held cost nothing again; requests sent past the cache are paid every run."""
    parts = [{"model": name, "part": part, **figures} for name, run in runs.items()
             for part, figures in run.spent.items()]
    if judge is not None:
        parts += [{"model": "judge", "part": part, **figures} for part, figures in judge.spent.items()]
    total = {key: sum(part.get(key, 0) for part in parts) for key in SPENT_KEYS}
    total["cost_usd"] = round(total["cost_usd"], 6)
    return {"parts": parts, "total": total}


def evaluate(config: EvalConfig, console: Any) -> tuple[dict[str, Any], Gate | None]:
    """Answer, score, report and gate, holding the output directory's lock (a second eval is refused)."""
    with DirectoryLock(config.output_dir, "eval.output_dir"):
        return _evaluate(config, console)


def _evaluate(config: EvalConfig, console: Any) -> tuple[dict[str, Any], Gate | None]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.time()
    items = load_golden(config.golden, config.metrics)
    regression = load_golden(config.regression, ["instruction"]) if config.regression else []
    clash = sorted({i.key for i in items} & {i.key for i in regression})
    if clash:
        raise RecipeError(f"eval.regression: items {clash[:3]} have the keys of eval.golden items (set/id); "
                          "rename the file or the ids")
    held_out = held_out_items(config) if config.fidelity else []
    golden = files_content([*config.golden, *config.regression])  # the bytes scored, for the students' lineage
    asked = items + regression + held_out  # every model answers all; the task's score reads `items` only
    _default_params(config)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    console.print(escape(f"{len(items)} golden item(s) from {', '.join(str(p) for p in config.golden)}; "
                         f"{len(config.models)} model(s)"), highlight=False)
    runs: dict[str, ModelRun] = {}
    for model in config.models:
        if model.provider == "local":
            began = time.monotonic()
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("•"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
            with progress:
                runs[model.name] = run_local(model, asked, perf_prompts=config.perf_prompts, progress=progress)
            perf = runs[model.name].perf
            cost = local_cost(perf, config.cost.gpu_hour_usd, config.cost.cpu_hour_usd)
            if cost is not None:
                perf["usd_per_1k_answers"] = cost
            console.print(escape(f"{model.name}: {len(asked)} answers and {perf.get('timed_prompts', 0)} timed "
                                 f"prompts in {time.monotonic() - began:.0f} s"), highlight=False)
        else:
            console.print(escape(f"{model.name}: {model.provider} {model.model} through the factory pipeline"),
                          highlight=False)
            runs[model.name] = run_hosted(model, asked, config.output_dir, console)
            measure_hosted(config, runs[model.name], items, console)

    judged: dict[str, dict[str, float]] = {}
    judge_result: JudgeResult | None = None
    if config.judge is not None:
        judge_result = run_judge(config.judge, items, runs, config.student_name(), config.reference_name(),
                                 config.output_dir, console)
        judged = judge_result.rubric
    scores = score_runs(config, items, runs, judged)
    summary = summarize(config, items, runs, scores)
    summary["golden"] = [str(p) for p in config.golden]
    summary["items"] = len(items)

    reference, student = config.reference_name(), config.student_name()
    extra: dict[str, Any] = {}
    if judge_result is not None and judge_result.pairwise:
        mean, low, high, method = mean_interval(list(judge_result.pairwise.values()), resamples=config.bootstrap,
                                                seed=config.seed)
        extra["pairwise"] = {"student": student, "against": reference, "win_rate": mean, "low": low, "high": high,
                             "interval": method,
                             "inconsistent_pairs": judge_result.inconsistent, "unparsed": judge_result.unparsed,
                             "cost_usd": judge_result.cost_usd}
    if reference in runs and student in runs and reference != student:
        s_run, t_run = runs[student], runs[reference]
        if config.cascade and any(a.confidence is not None for a in s_run.answers.values()):
            extra["cascade"] = distill.cascade({k: a.confidence for k, a in s_run.answers.items()},
                                               scores[student]["overall"], scores[reference]["overall"])
        if distill.share_tokenizer(s_run, t_run):
            extra["divergence_kl"] = distill.divergence(s_run, t_run, items)
            if config.speculative:
                extra["speculative"] = distill.speculative(s_run, t_run, items, int(config.params.get("max_tokens", 64)))
    if regression:
        summary["regression"] = regression_summary(config, regression, score_runs(config, regression, runs, {}))
    if held_out:
        summary["fidelity"] = {"items": len(held_out), "ids": [item.id for item in held_out], "models": set_means(
            config, held_out, score_runs(config, held_out, runs, {}))}
    summary.update(extra)
    summary["spend"] = spend(runs, judge_result)
    gate = check_gate(config, summary)
    summary["gate"] = None if gate is None else {"passed": gate.passed, "reason": gate.reason}
    summary["elapsed_s"] = round(time.time() - started, 1)
    summary["examples"] = worst_examples(items, runs, scores, student, reference)

    total = summary["spend"]["total"]
    if total["requests"] or total["cost_usd"]:
        console.print(escape(f"spent by this eval: {usd(total['cost_usd'])} on {total['requests']} request(s) "
                             f"({total['input_tokens']} input, {total['output_tokens']} output tokens)"),
                      highlight=False)
    write_reports(config.output_dir, summary)
    record_in_lineages(config, summary, runs, golden)
    (config.output_dir / "answers.jsonl").write_text(
        "".join(json.dumps({"key": item.key, **{name: run.answers[item.key].text for name, run in runs.items()},
                            "reference": item.reference}) + "\n" for item in items), encoding="utf-8")
    return summary, gate


PERF_KEYS = ("latency_p50_s", "latency_p99_s", "output_tokens_per_s", "usd_per_1k_answers")


def record_in_lineages(config: EvalConfig, summary: dict[str, Any], runs: dict[str, ModelRun],
                       golden: list[dict[str, Any]]) -> None:
    """Each trained student evaluated (a local model with a lineage.json) gets this eval in its lineage:
    scores, retention, the gate where it is the student, latency and cost, and the golden sets' hashes."""
    for name, run in runs.items():
        path = lineage_path_for(run.config.model) if run.config.provider == "local" else None
        if path is None:
            continue
        model = summary["models"][name]
        record_eval(path, {
            "eval_dir": str(config.output_dir), "model_name": name, "golden": golden, "items": summary["items"],
            "score": model["metrics"]["overall"]["mean"],
            "retention": model.get("retention", {}).get("overall", {}).get("ratio"),
            "reference": summary["reference"],
            "gate": summary["gate"] if name == summary["student"] else None,
            "perf": {key: run.perf[key] for key in PERF_KEYS if key in run.perf},
            "frontier": model.get("frontier"),
        })


def worst_examples(items: list[GoldenItem], runs: dict[str, ModelRun], scores: dict[str, Any], student: str,
                   reference: str | None, count: int = 5) -> list[dict[str, Any]]:
    """Where the student falls furthest behind the reference (or scores lowest, with no reference)."""
    def gap(item: GoldenItem) -> float:
        ref = scores[reference]["overall"][item.key] if reference in scores else 1.0
        return ref - scores[student]["overall"][item.key]

    chosen = sorted(items, key=gap, reverse=True)[:count]
    return [{"key": item.key, "prompt": item.prompt_text, "reference": item.reference, "gap": gap(item),
             "answers": {name: run.answers[item.key].text for name, run in runs.items()}}
            for item in chosen if gap(item) > 0]
