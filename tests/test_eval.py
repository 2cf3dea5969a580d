"""eval: metrics with hand-computed values, golden-set and recipe errors, the gate's exit code both ways,
the judge through the real openai SDK against the fake server, HTML escaping, and a local model run."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest
from helpers import REPO
from test_sft import tiny_student  # noqa: F401  (a module-scoped fixture: a 2-layer random Llama)

from apprentice.errors import RecipeError
from eval import metrics
from eval.__main__ import main
from eval.config import EvalConfig, load_eval_config
from eval.distill import cascade
from eval.golden import load_golden
from eval.judge import pair_outcome, parse_score, parse_verdict
from factory.records import Sample
from quality_checks import build_checks


# ---- metrics -----------------------------------------------------------------------------------------
def test_exact_and_normalized():
    assert metrics.exact(" Paris ", "Paris") == 1.0
    assert metrics.exact("paris", "Paris") == 0.0
    assert metrics.normalized("The Paris!", "paris") == 1.0
    assert metrics.normalized("Paris, France", "Paris") == 0.0


# (answer, reference, same answer?): the factory's `reference: normalized` check and eval's `normalized`
# metric must agree on every line, with `fold_answer` the one rule behind both.
NORMALIZED_TABLE = [
    ("don't", "dont", True),                    # apostrophe deleted, not turned into a space
    ("Don’t", "dont", True),                    # the typographic apostrophe too
    ("It's Paris", "its paris", True),
    ("The Paris!", "paris", True),              # articles dropped, punctuation deleted
    ("an apple", "Apple", True),
    ("A", "", True),                            # an article alone folds to nothing
    ("Theatre", "atre", False),                 # "the" only as a whole word
    ("Paris, France", "Paris", False),
    ("  New   York. ", "new york", True),
    ("«Zürich»", "zürich", True),               # Unicode punctuation and letters
    ("ÉCOLE", "école", True),
    ("Straße", "STRASSE", True),                # casefold, not lower
    ("Ｐａｒｉｓ", "Paris", True),                # fullwidth (NFKC)
    ("ﬁnal", "final", True),                    # ligature (NFKC)
    ("3.5", "35", True),                        # the price of deleting punctuation
    ("New-York", "new york", False),
]


@pytest.mark.parametrize("answer, reference, same", NORMALIZED_TABLE)
def test_the_factory_reference_check_and_the_normalized_metric_agree(answer, reference, same):
    check = build_checks([{"name": "reference", "mode": "normalized"}])[0]
    sample = Sample(id="s", prompt=[{"role": "user", "content": "q"}],
                    completion=[{"role": "assistant", "content": answer}], teacher={}, reference=reference)
    assert check(sample).passed is same, f"factory check on {answer!r} vs {reference!r}"
    assert metrics.normalized(answer, reference) == float(same), f"eval metric on {answer!r} vs {reference!r}"


def test_token_f1_by_hand():
    # answer "the cat sat on mat" → cat sat on mat (4); reference "cat on the mat" → cat on mat (3); common 3
    # precision 3/4, recall 3/3 → F1 = 2·0.75·1 / 1.75 = 0.857142…
    assert metrics.token_f1("the cat sat on mat", "cat on the mat") == pytest.approx(6 / 7)
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("", "") == 1.0


def test_rouge_l_by_hand():
    # pred "x y z w", ref "x z w q": LCS = x z w = 3; P = 3/4, R = 3/4 → F1 0.75
    assert metrics.rouge_l("x y z w", "x z w q") == pytest.approx(0.75)
    assert metrics.rouge_l("x", "y") == 0.0


def test_regex_and_json_metrics():
    assert metrics.regex("answer: 42", r"\b42\b") == 1.0
    assert metrics.regex("answer: 421", r"\b42\b") == 0.0
    assert metrics.json_valid('{"a": 1}') == 1.0
    assert metrics.json_valid('```json\n{"a": 1}\n```') == 1.0
    assert metrics.json_valid("{a: 1}") == 0.0
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    assert metrics.json_schema('{"name": "Ann"}', schema) == 1.0
    assert metrics.json_schema('{"name": 3}', json.dumps(schema)) == 0.0
    assert metrics.json_match('{"city": "Rome", "name": "Ann"}', '{"name": "Ann", "city": "Rome"}') == 1.0
    assert metrics.json_match('{"name": "Ann"}', '{"name": "Ann", "city": "Rome"}') == 0.0
    assert metrics.json_match("not json", '{"a": 1}') == 0.0


def test_the_number_metric_reads_the_last_number_as_the_reference_check_does(tmp_path):
    check = build_checks([{"name": "reference", "mode": "number"}])[0]
    for answer, reference, right in [("3 apples and 4 more: 7", "7", True), ("so the answer is 1,234.0.", "1234", True),
                                     ("7 is not it, 8 is", "7", False), ("no idea", "7", False),
                                     ("−12 degrees", "-12", True)]:
        assert metrics.number(answer, reference) == float(right), (answer, reference)
        sample = Sample(id="s", prompt=[{"role": "user", "content": "q"}],
                        completion=[{"role": "assistant", "content": answer}], teacher={}, reference=reference)
        assert check(sample).passed is right, (answer, reference)
    golden = tmp_path / "g.jsonl"
    golden.write_text('{"prompt": "2+2?", "reference": "four", "metric": "number"}\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=r"g.jsonl:1.*not a number"):
        load_golden([golden], ["number"])


def test_pass_fail_means_get_a_wilson_interval_by_hand():
    # Wilson, z = 1.95996: 0 of n → [0, z²/(n + z²)]; n of n → [n/(n + z²), 1]; 60 + z² = 63.84146.
    assert metrics.mean_interval([0.0] * 60) == pytest.approx((0.0, 0.0, 3.841459 / 63.841459, "wilson"))
    assert metrics.mean_interval([1.0] * 60) == pytest.approx((1.0, 60 / 63.841459, 1.0, "wilson"))
    # 30 of 60: centre 0.5, half-width z/(1 + z²/60) · √(0.25/60 + z²/(4·60²)) = 1.842029 · 0.066584 = 0.12265
    mean, low, high, method = metrics.mean_interval([0.0, 1.0] * 30)
    assert (mean, method) == (0.5, "wilson")
    assert (low, high) == pytest.approx((0.37735, 0.62265), abs=1e-5)
    assert metrics.mean_interval([True, False]).method == "wilson", "a boolean verifier is pass/fail too"
    assert metrics.mean_interval([]).method == "none"


def test_graded_means_and_retention_get_a_bca_interval():
    values = [0.1, 0.5, 0.7, 0.9, 0.3, 0.6] * 10
    mean, low, high, method = metrics.mean_interval(values, seed=1)
    assert method == "bca"
    assert low < mean < high, f"[{low}, {high}] must contain the mean {mean}"
    assert 0.02 < high - low < 0.2, f"a varied graded mean of 60 items has a real width: [{low}, {high}]"
    # Every value equal: BCa is undefined; the percentile interval of the same resamples says so.
    assert metrics.mean_interval([0.5] * 10) == (0.5, 0.5, 0.5, "percentile")

    ratio, low, high, method = metrics.ratio_interval([1, 0, 1, 1] * 5, [1, 1, 1, 1] * 5)
    assert (ratio, method) == (0.75, "paired bca")
    assert low < 0.75 < high <= 1.0
    assert math.isnan(metrics.ratio_interval([1], [0]).value)
    # Graded and equal item by item: every paired resample gives 1.0; BCa is undefined and the label says so.
    assert metrics.ratio_interval([0.5] * 3, [0.5] * 3) == (1.0, 1.0, 1.0, "paired percentile")


def test_a_student_with_none_right_keeps_an_upper_bound_on_its_retention():
    # 0 of 60 against 48 of 60: every paired resample's ratio is 0. MOVER-R from the Wilson intervals:
    # low 0; high = u1 / √(l2 (2·0.8 − l2)) with u1 = 0.060172 (0 of 60) and l2 = 0.682182 (48 of 60) = 0.07604.
    ratio, low, high, method = metrics.ratio_interval([0] * 60, [1] * 48 + [0] * 12)
    assert (ratio, low, method) == (0.0, 0.0, "mover wilson")
    assert high == pytest.approx(0.07604, abs=1e-5)
    # The same items right: the ratio is 1, and the interval is not [1, 1].
    ratio, low, high, method = metrics.ratio_interval([1, 0, 1] * 20, [1, 0, 1] * 20)
    assert (ratio, method) == (1.0, "mover wilson") and low < 0.9 and high > 1.1


def test_judge_parsing_and_both_orders():
    assert parse_score("Score: 7/10") == 0.7 and parse_score("10") == 1.0 and parse_score("none") is None
    assert parse_verdict("A") == "A" and parse_verdict("  b.") == "B" and parse_verdict("Tie") == "tie"
    assert parse_verdict("I think") is None
    assert pair_outcome("A", "B") == (1.0, True)   # the student wins in both orders
    assert pair_outcome("B", "A") == (0.0, True)   # the student loses in both orders
    assert pair_outcome("A", "A") == (0.5, False)  # position bias: inconsistent → tie
    assert pair_outcome("tie", "tie") == (0.5, True)


def test_cascade_routes_least_confident_first():
    conf = {"a": -0.1, "b": -2.0, "c": -1.0}
    student = {"a": 1.0, "b": 0.0, "c": 0.0}
    teacher = {"a": 1.0, "b": 1.0, "c": 1.0}
    points = cascade(conf, student, teacher, steps=3)
    assert [p["quality"] for p in points] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert points[1]["threshold"] == -2.0


# ---- golden sets and recipes ------------------------------------------------------------------------
def test_golden_errors_name_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "ok", "reference": "x"}\n{"prompt": "q", "metric": "exact"}\n'
                    '{"prompt": "q", "reference": "y", "metric": "bleu"}\nnot json\n{"prompt": "q", "colour": 1}\n')
    with pytest.raises(RecipeError) as info:
        load_golden([path], ["normalized"])
    message = str(info.value)
    assert "4 problem(s)" in message
    for line, text in [(2, "need a \"reference\""), (3, "unknown metric"), (4, "not valid JSON"), (5, "colour")]:
        assert f"g.jsonl:{line}:" in message and text in message


def test_eval_section_errors_have_key_paths(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  golden: [g.jsonl]\n  models:\n    - {name: a, provider: nope}\n    - {name: a}\n"
                      "  gate: {min_retention: 0.9, colour: red}\n")
    with pytest.raises(RecipeError) as info:
        load_eval_config(recipe)
    message = str(info.value)
    assert "eval.models.0.provider" in message and "eval.gate.colour" in message
    recipe.write_text("eval:\n  golden: [g.jsonl]\n  models: [{name: a}, {name: a}]\n")
    with pytest.raises(RecipeError, match="repeated"):
        load_eval_config(recipe)
    recipe.write_text("factory: null\n")
    assert main(["run", str(recipe)]) == 2


def test_recipes_with_an_eval_section_parse():
    for path in sorted((REPO / "data" / "recipes").glob("*.yaml")):
        if "\neval:" in path.read_text():
            config = load_eval_config(path)
            assert isinstance(config, EvalConfig) and config.models


# ---- end to end through the fake server ------------------------------------------------------------
def _golden(tmp_path: Path, count: int = 6) -> Path:
    path = tmp_path / "golden.jsonl"
    with path.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"q{i}", "prompt": f"capital {i}", "reference": f"city {i}",
                                     "tags": ["geo" if i % 2 else "misc"]}) + "\n")
    return path


def _responder(messages, index, body):
    """teacher: always right; student: right on even items, a <script> on odd ones; judge: 7/10, prefers A
    (as the JSON its structured-output request asks for)."""
    model, question = body["model"], messages[-1]["content"]
    if model == "judge":
        assert body["response_format"]["type"] == "json_schema", "a hosted judge asks for structured output"
        return {"rationale": "r", "score": 7} if "Rubric" in question else {"rationale": "r", "winner": "A"}
    number = question.split()[-1]
    if model == "teacher-model" or int(number) % 2 == 0:
        return f"city {number}"
    return "<script>alert('x')</script>"


def _eval_recipe(tmp_path: Path, server, extra: str = "") -> Path:
    hosted = f"provider: openai, base_url: '{server.openai_base_url}', api_key_env: APPRENTICE_TEST_KEY"
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "eval:\n"
        f"  output_dir: {tmp_path / 'out'}\n"
        f"  golden: [{_golden(tmp_path)}]\n"
        "  metrics: [normalized, token_f1]\n"
        "  models:\n"
        f"    - {{name: teacher, role: teacher, model: teacher-model, {hosted}}}\n"
        f"    - {{name: student, role: student, model: student-model, {hosted}}}\n"
        f"{extra}"
    )
    return recipe


def test_gate_exit_codes_and_escaped_report(tmp_path, server, env_key):
    server.config.responder = _responder
    recipe = _eval_recipe(tmp_path, server, "  gate: {min_retention: 0.5}\n")
    assert main(["run", str(recipe)]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    student = results["models"]["student"]
    assert student["metrics"]["normalized"]["mean"] == pytest.approx(0.5)
    assert student["retention"]["overall"]["ratio"] == pytest.approx(0.5)
    assert student["tags"] == {"geo": 0.0, "golden": 0.5, "misc": 1.0}
    assert results["gate"]["passed"] is True
    page = (out / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert (out / "report.md").exists() and (out / "scores.png").stat().st_size > 1000

    # The same answers again come from the cache: nothing is sent, and a stricter gate fails with exit 1.
    server.reset_stats()
    assert main(["run", str(recipe), "--set", "eval.gate.min_retention=0.9"]) == 1
    assert server.stats.total == 0
    results = json.loads((out / "results.json").read_text())
    assert results["gate"] == {"passed": False, "reason": "student: retention 50.0 % < min_retention 90 %"}


def test_judge_rubric_and_pairwise_through_the_sdk(tmp_path, server, env_key):
    server.config.responder = _responder
    judge = (f"  judge: {{provider: openai, model: judge, base_url: '{server.openai_base_url}', "
             "api_key_env: APPRENTICE_TEST_KEY, rubric: 'correct city', params: {temperature: 0, max_tokens: 16}}\n")
    recipe = _eval_recipe(tmp_path, server, judge)
    assert main(["run", str(recipe)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"]["teacher"]["metrics"]["judge"]["mean"] == pytest.approx(0.7)
    pairwise = results["pairwise"]
    # The judge always says "A": every pair disagrees with itself across the two orders → all ties.
    assert pairwise["win_rate"] == 0.5 and pairwise["inconsistent_pairs"] == 6
    assert pairwise["unparsed"] == 0, "every structured verdict is read"
    asked = [json.dumps(b, sort_keys=True) for b in server.stats.bodies if b["model"] == "judge"]
    # Rubric for 2 models + pairwise in 2 orders, 6 items each: 24 questions, each distinct body sent once
    # (where the two models gave the same answer, their rubric questions are the same request).
    assert len(asked) == len(set(asked)) == 18


def test_missing_golden_file_and_missing_verifier(tmp_path, server, env_key):
    recipe = _eval_recipe(tmp_path, server)
    text = recipe.read_text().replace(str(tmp_path / "golden.jsonl"), str(tmp_path / "nope.jsonl"))
    recipe.write_text(text)
    assert main(["run", str(recipe)]) == 2
    golden = _golden(tmp_path)
    golden.write_text('{"prompt": "q", "metric": "verifier"}\n')
    recipe.write_text(text.replace(str(tmp_path / "nope.jsonl"), str(golden)))
    assert main(["run", str(recipe)]) == 2


# ---- the report ------------------------------------------------------------------------------------
def _summary() -> dict:
    """A summary as eval/run.py writes it: a local teacher and a student of the same size, everything on."""
    def model(role, mean, low, high, interval="wilson", **extra):
        perf = {"latency_p50_s": 0.5, "latency_p99_s": 0.9, "ttft_p50_s": 0.05, "output_tokens_per_s": 40.0,
                "parameters": 134_515_008, "disk_bytes": 270 * 2**20, "loaded_mib": 600.0, "timed_prompts": 8,
                "latencies_s": [0.4, 0.5, 0.6]}
        return {"role": role, "provider": "local", "model": "m", "perf": perf, "lineage": None,
                "metrics": {m: {"mean": mean, "low": low, "high": high, "n": 60, "interval": interval}
                            for m in ("overall", "json_match")},
                "tags": {"golden": mean, "hard": mean / 2}, **extra}

    retention = {m: {"ratio": 1.125, "low": 0.98, "high": 1.29, "interval": "paired bca"}
                 for m in ("overall", "json_match")}
    lineage = {"base_model": {"name": "builtin:smollm2-135m-instruct"}, "data": [{"path": "runs/demo", "samples": 234}],
               "splits": {"train": 207, "eval": 27, "held_out": 0.1, "seed": 0}, "global_step": 26,
               "metrics": {"eval_loss": 0.049}, "sft": {"lora": {"r": 16, "alpha": 32}, "learning_rate": 2e-4,
                                                        "epochs": 1, "distill": None},
               "hardware": {"device": "cpu"}, "git_commit": "abc1234", "started_at": "2025-01-01T00:00:00",
               "seconds": 150.2}
    return {
        "items": 60, "golden": ["data/golden/extraction.jsonl"], "reference": "teacher", "student": "trained student",
        "bootstrap_resamples": 1000, "gate": {"passed": True, "reason": "trained student: retention 112.5 % ≥ 90 %"},
        "models": {
            "teacher": model("teacher", 0.8, 0.68, 0.88),
            "untrained student": model("baseline", 0.0, 0.0, 0.0602, retention={
                "overall": {"ratio": 0.0, "low": 0.0, "high": 0.0, "interval": "paired percentile"}},
                retention_by_tag={"golden": 0.0, "hard": 0.0}, agreement=0.0),
            "trained student": {**model("student", 0.9, 0.8, 0.95, lineage=lineage), "retention": retention,
                                "retention_by_tag": {"golden": 1.125, "hard": 1.125}, "agreement": 0.8},
        },
        "cascade": [{"routed": 0.0, "quality": 0.9, "threshold": None}, {"routed": 0.2, "quality": 0.933,
                                                                        "threshold": -0.31},
                    {"routed": 1.0, "quality": 0.8, "threshold": -0.01}],
        "divergence_kl": 0.412,
        "speculative": {"prompts": 4, "acceptance_rate": 0.55, "teacher_alone_s": 3.1, "with_draft_s": 4.84,
                        "speedup": 0.64},
        "pairwise": {"student": "trained student", "against": "teacher", "win_rate": 0.55, "low": 0.45, "high": 0.65,
                     "interval": "bca", "inconsistent_pairs": 6, "unparsed": 0, "cost_usd": 0.0},
        "examples": [{"key": "q1", "prompt": "Ann <b>lives</b> in Rome", "reference": '{"name": "Ann"}', "gap": 1.0,
                      "answers": {"teacher": '{"name": "Ann"}', "trained student": "<script>alert(1)</script>"}}],
    }


def test_every_report_section_has_a_table_and_a_reading_and_no_raw_json(tmp_path):
    from eval.report import write_reports

    write_reports(tmp_path, _summary())
    page = (tmp_path / "report.html").read_text()
    for key, reading in [
        ("scores", "trained student scores 90.0 % [80.0, 95.0], keeping 112.5 % [98.0, 129.0] of teacher's 80.0 %"),
        ("metrics", "json_match is the only metric"),
        ("tags", "trained student is weakest on tag hard (45.0 %, retention 112.5 %)"),
        ("latency", "trained student answers in 0.50 s at p50, 1.00× the time teacher takes"),
        ("cascade", "routing the 20.0 % least confident answers of trained student to teacher lifts the score "
                    "from 90.0 % to 93.3 %"),
        ("pairwise", "win rate 55.0 %, so it is level with it"),
        ("speculative", "0.64× — slower: the draft model (135 M parameters) is as large as the target (135 M); "
                        "it pays off only with a much smaller draft"),
        ("divergence", "0.412 nats per token"),
        ("examples", "the 1 golden item(s) where trained student falls furthest behind teacher"),
        ("lineage", "trained student is LoRA r16 alpha 32 on builtin:smollm2-135m-instruct, 26 steps on 207 samples"),
    ]:
        section = page.split(f"<h2 id='{key}'>")
        assert len(section) == 2, f"report.html has no section {key!r}"
        body = section[1].split("<h2")[0]
        assert "<table>" in body, f"section {key!r} has no table"
        assert html.escape(reading) in body, f"section {key!r} lacks its reading {reading!r}"
    assert '{"' not in page.replace(html.escape('{"name": "Ann"}'), ""), "a raw JSON dump is left in report.html"
    assert "&quot;prompts&quot;" not in page and "&quot;base_model&quot;" not in page, "speculative/lineage as JSON"
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>lives</b>" not in page
    # Every interval names its method; retention reads as percent, never as a ratio.
    assert "Wilson" in page and "paired BCa bootstrap" in page
    assert "1.125" not in page and "112.5 %" in page
    md = (tmp_path / "report.md").read_text()
    assert "0.64× — slower" in md and "| json_match |" in md and "Wilson" in md
    assert "```json" not in md, "a raw JSON dump is left in report.md"
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; |" in md, "model text in a Markdown table cell is escaped"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["models"]["trained student"]["retention"]["overall"]["ratio"] == 1.125


@pytest.mark.parametrize("speedup, draft, reading", [
    (0.64, 134_515_008, "0.64× — slower: the draft model (135 M parameters) is as large as the target (135 M)"),
    (1.38, 134_515_008, "1.38× — faster on this run, but the draft model (135 M parameters) is as large as the target"),
    (1.0, 134_515_008, "1.00× — no gain: the draft model"),
    (1.9, 20_000_000, "1.90× — faster: teacher accepts 55.0 % of trained student's drafted tokens"),
    (0.8, 20_000_000, "0.80× — slower: only 55.0 % of the drafted tokens are accepted"),
])
def test_the_speculative_reading_says_why(speedup, draft, reading):
    from eval.readings import speculative

    summary = _summary()
    summary["speculative"]["speedup"] = speedup
    summary["models"]["trained student"]["perf"]["parameters"] = draft
    assert speculative(summary).reading.startswith(reading)


def test_the_terminal_table_prints_retention_as_percent_with_its_interval():
    from rich.console import Console

    from eval.report import print_table

    console = Console(record=True, width=220)
    print_table(_summary(), console)
    text = console.export_text()
    assert "112.5 % [98.0, 129.0]" in text and "1.125" not in text
    assert "Speculative decoding: 0.64× — slower: the draft model" in text


# ---- local models -------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_models_get_latency_size_confidence_and_divergence(tmp_path, tiny_student):  # noqa: F811
    golden = tmp_path / "g.jsonl"
    golden.write_text("".join(json.dumps({"prompt": f"{c} b", "reference": c.upper()}) + "\n" for c in "abcd"))
    config = EvalConfig.model_validate({
        "output_dir": tmp_path / "out", "golden": [golden], "perf_prompts": 2,
        "params": {"temperature": 0, "max_tokens": 4},
        "models": [
            {"name": "teacher", "role": "teacher", "model": str(tiny_student),
             "context": [{"role": "system", "content": "answer"}]},
            {"name": "student", "role": "student", "model": str(tiny_student)},
        ],
    })
    from rich.console import Console

    from eval.run import evaluate

    summary, gate = evaluate(config, Console(quiet=True))
    assert gate is None
    perf = summary["models"]["student"]["perf"]
    assert perf["parameters"] > 0 and perf["disk_bytes"] > 0 and perf["timed_prompts"] == 2
    assert perf["latency_p50_s"] > 0 and perf["ttft_p50_s"] > 0
    assert summary["divergence_kl"] >= 0 and len(summary["cascade"]) == 11
    assert 0 <= summary["speculative"]["acceptance_rate"] <= 1
    assert (tmp_path / "out" / "report.html").exists()
