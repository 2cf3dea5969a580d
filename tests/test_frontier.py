"""The frontier: a hosted teacher (the fake provider, with a price and a latency) against a local student (a
tiny random Llama on the CPU): latency, throughput, cost per 1k answers, speed-up and cost ratio in the table
and the report, and gates on them that fail and pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_llama

from apprentice.config import validate_section
from apprentice.errors import RecipeError
from eval.__main__ import main
from eval.answer import local_cost, served_throughput, time_hosted
from eval.config import EvalConfig, ModelConfig
from eval.golden import load_golden
from eval.readings import pareto_optimal
from eval.run import frontier

torch.set_num_threads(1)
LATENCY_S = 0.25


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-frontier"))


def _golden(tmp_path: Path) -> Path:
    golden = tmp_path / "golden.jsonl"
    # A regex any answer matches: a random 2-layer model keeps the teacher's score, so the gates on speed and
    # cost are what these tests move.
    golden.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"a {c}", "reference": ".*", "metric": "regex"})
                              + "\n" for i, c in enumerate("abcd")))
    return golden


def _recipe(tmp_path: Path, server, student: Path, gate: str) -> Path:
    golden = _golden(tmp_path)
    hosted = (f"provider: openai, model: teacher-model, base_url: '{server.openai_base_url}', "
              "api_key_env: APPRENTICE_TEST_KEY, price: {input: 2.5, output: 10.0}")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "eval:\n"
        f"  output_dir: {tmp_path / 'out'}\n"
        f"  golden: [{golden}]\n"
        "  params: {temperature: 0, max_tokens: 4}\n"
        "  perf_prompts: 3\n"
        "  timed_requests: 3\n"
        "  bootstrap: 100\n"
        "  cost: {cpu_hour_usd: 0.4}\n"
        f"  gate: {gate}\n"
        "  models:\n"
        f"    - {{name: teacher, role: teacher, {hosted}}}\n"
        f"    - {{name: student, role: student, provider: local, model: {student}}}\n",
        encoding="utf-8")
    return recipe


def test_speed_up_and_cost_ratio_by_hand():
    assert frontier({"latency_p50_s": 0.05, "usd_per_1k_answers": 0.2},
                    {"latency_p50_s": 0.5, "usd_per_1k_answers": 4.0}) == {"speedup": 10.0, "cost_ratio": 0.05}
    assert frontier({"usd_per_1k_answers": 0.2}, {"latency_p50_s": 0.5}) == {"speedup": None, "cost_ratio": None}
    # 2 answers/s on a $0.72 CPU hour: 500 s for 1k answers = $0.10; on cuda the GPU price counts.
    assert local_cost({"answers_per_s": 2.0, "device": "cpu"}, 9.0, 0.72) == pytest.approx(0.1)
    assert local_cost({"answers_per_s": 2.0, "device": "cuda:0"}, 3.6, 0.72) == pytest.approx(0.5)
    assert local_cost({"answers_per_s": 2.0, "device": "cpu"}, 3.6, None) is None


def test_pareto_optimal_models_by_hand():
    def model(score, latency):
        return {"metrics": {"overall": {"mean": score}}, "perf": {"latency_p50_s": latency}}

    summary = {"models": {"big": model(0.9, 1.0), "small": model(0.8, 0.1), "worse": model(0.7, 0.5),
                          "tie": model(0.8, 0.1), "untimed": model(1.0, None)}}
    assert pareto_optimal(summary, "latency_p50_s") == ["big", "small", "tie"], "worse is slower and scores less"


@pytest.mark.one_client
def test_a_gate_on_min_speedup_fails_and_passes_against_a_slow_priced_hosted_teacher(tmp_path, server, env_key,
                                                                                      tiny, capsys):
    server.config.latency_s = LATENCY_S
    server.config.responder = lambda messages, index, body: messages[-1]["content"].split()[-1].upper()
    recipe = _recipe(tmp_path, server, tiny, "{min_retention: 0.9, min_speedup: 1000}")
    assert main(["run", str(recipe)]) == 1, "no student is a thousand times faster"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    teacher, student = results["models"]["teacher"], results["models"]["student"]
    assert teacher["perf"]["timed_prompts"] == 3 and teacher["perf"]["latency_p50_s"] >= LATENCY_S
    assert teacher["perf"]["usd_per_1k_answers"] > 0, "priced from its tokens"
    assert student["perf"]["answers_per_s"] > 0 and student["perf"]["batch_size"] == 8
    assert student["perf"]["usd_per_1k_answers"] == pytest.approx(
        1000 * 0.4 / 3600 / student["perf"]["answers_per_s"], rel=1e-3)
    speedup = student["frontier"]["speedup"]
    assert speedup == pytest.approx(teacher["perf"]["latency_p50_s"] / student["perf"]["latency_p50_s"], rel=1e-3)
    assert speedup > 2, f"a 2-layer model on the CPU answers faster than a {LATENCY_S} s round trip: {speedup}"
    assert student["frontier"]["cost_ratio"] == pytest.approx(
        student["perf"]["usd_per_1k_answers"] / teacher["perf"]["usd_per_1k_answers"], rel=1e-3)
    assert results["gate"]["passed"] is False and "retention" not in results["gate"]["reason"]
    assert f"speed-up {speedup:.2f}× < min_speedup 1000×" in results["gate"]["reason"], results["gate"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| speed-up |" in report and "cost ratio" in report and f"{speedup:.3g}×" in report
    assert "Pareto-optimal on quality × latency: student; on quality × cost: student." in report, \
        "the same score, faster and cheaper: the teacher is dominated"
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "speed-up" in out and "cost ratio" in out, "the terminal table shows both"

    # Answers come from the cache now; the timing requests go out again, as they must to be timed.
    server.reset_stats()
    passing = "{min_retention: 0.9, min_speedup: 2, max_cost_ratio: 100, max_latency_p99_s: 30}"
    assert main(["run", str(recipe), "--set", f"eval.gate={passing}"]) == 0
    assert server.stats.total == 3, "three timed requests and no answer re-asked"
    gate = json.loads((tmp_path / "out" / "results.json").read_text())["gate"]
    assert gate["passed"] is True and "speed-up" in gate["reason"] and "× ≥ 2×" in gate["reason"], gate


@pytest.mark.one_client
def test_gates_on_unmeasured_figures_fail_saying_which_setting_measures_them(tmp_path, server, env_key, tiny):
    server.config.responder = lambda messages, index, body: "A"
    recipe = _recipe(tmp_path, server, tiny, "{min_retention: 0.9, min_speedup: 2, max_cost_ratio: 1, "
                                             "max_latency_p99_s: 0.000001}")
    assert main(["run", str(recipe), "--set", "eval.timed_requests=0", "--set", "eval.cost={}"]) == 1
    reason = json.loads((tmp_path / "out" / "results.json").read_text())["gate"]["reason"]
    assert "speed-up undefined" in reason and "eval.timed_requests" in reason, reason
    assert "cost ratio undefined" in reason and "set eval.cost for local models" in reason, reason
    assert "p99 latency" in reason and "> max_latency_p99_s 1e-06 s" in reason, reason


# ---- a served student: throughput at a concurrency, its cost from eval.cost, and what the eval spent ------
def _served_recipe(tmp_path: Path, server, extra: str = "") -> Path:
    golden = _golden(tmp_path)
    hosted = (f"provider: openai, base_url: '{server.openai_base_url}', api_key_env: APPRENTICE_TEST_KEY")
    recipe = tmp_path / "served.yaml"
    recipe.write_text(
        "eval:\n"
        f"  output_dir: {tmp_path / 'out'}\n"
        f"  golden: [{golden}]\n"
        "  params: {temperature: 0, max_tokens: 4}\n"
        "  bootstrap: 100\n"
        "  cost: {gpu_hour_usd: 3.6, cpu_hour_usd: 0.1}\n"
        f"{extra}"
        "  models:\n"
        f"    - {{name: teacher, role: teacher, model: teacher-model, price: {{input: 2.5, output: 10.0}}, {hosted}}}\n"
        f"    - {{name: student, role: student, model: student-model, {hosted}}}\n",
        encoding="utf-8")
    return recipe


def test_served_concurrency_needs_a_served_model_and_the_sweep_turns_paid_passes_off(tmp_path):
    from sft.sweep import _trial_eval

    local = {"name": "s", "provider": "local", "model": "x"}
    with pytest.raises(RecipeError, match="served_concurrency: 4: no model has a base_url .* remove served_concurrency"):
        validate_section(EvalConfig, "eval", {"golden": ["g.jsonl"], "models": [local], "served_concurrency": 4})
    with pytest.raises(RecipeError, match=r"eval\.cost\.served_on"):
        validate_section(EvalConfig, "eval", {"golden": ["g.jsonl"], "models": [local], "cost": {"served_on": "tpu"}})
    config = EvalConfig(golden=["g.jsonl"], models=[local, {"name": "t", "provider": "openai", "model": "m",
                                                            "base_url": "http://127.0.0.1:9/v1"}],
                        timed_requests=8, served_concurrency=4)
    trial = _trial_eval(config, config.models, "s", tmp_path)
    assert (trial.timed_requests, trial.served_concurrency) == (0, 0), "a sweep's scoring evals send no paid request"


def test_a_served_model_gets_throughput_at_a_concurrency_and_its_cost_from_eval_cost(tmp_path, server, env_key,
                                                                                     capsys):
    server.config.responder = lambda messages, index, body: "A B"
    recipe = _served_recipe(tmp_path, server, "  served_concurrency: 3\n")
    assert main(["run", str(recipe)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in ("teacher", "student"):  # both have a base_url: each is measured
        perf = results["models"][name]["perf"]
        assert perf["concurrency"] == 3 and perf["throughput_requests"] == 4, "each golden prompt, 3 at a time"
        assert perf["answers_per_s"] > 0 and perf["batch_output_tokens_per_s"] > 0, perf
    student, teacher = results["models"]["student"]["perf"], results["models"]["teacher"]["perf"]
    assert student["usd_per_1k_answers"] == pytest.approx(1000 * 3.6 / 3600 / student["answers_per_s"], rel=1e-6), \
        "a served model without a price: the GPU hour over the answers per hour measured"
    assert student["priced_by"] == "eval.cost.gpu_hour_usd" and "priced_by" not in teacher, "a price wins"
    assert teacher["usd_per_1k_answers"] == pytest.approx(1000 * teacher["cost_usd"] / 4), "priced from its tokens"
    assert results["models"]["student"]["frontier"]["cost_ratio"] == pytest.approx(
        student["usd_per_1k_answers"] / teacher["usd_per_1k_answers"], rel=1e-3)
    assert "timed_prompts" not in student, "timing stays off unless eval.timed_requests asks for it"
    assert "student: throughput of 4 request(s), 3 at once, past the cache" in capsys.readouterr().err

    server.reset_stats()
    assert main(["run", str(recipe), "--set", "eval.cost.served_on=cpu"]) == 0
    assert server.stats.total == 8, "the answers come from the cache; the throughput requests go out again"
    again = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["student"]["perf"]
    assert again["priced_by"] == "eval.cost.cpu_hour_usd"
    assert again["usd_per_1k_answers"] == pytest.approx(1000 * 0.1 / 3600 / again["answers_per_s"], rel=1e-6)


def test_the_throughput_pass_sends_its_requests_together_and_a_failure_is_data(tmp_path, server, env_key):
    # One serving slot: a request that finds it busy waits. Sent one at a time none waits; sent together some do.
    server.config.capacity, server.config.latency_s = 1, 0.2
    items = load_golden([_golden(tmp_path)], ["regex"])
    model = ModelConfig(name="served", provider="openai", model="m", base_url=server.openai_base_url,
                        api_key_env="APPRENTICE_TEST_KEY", params={"max_tokens": 4})
    timed, _ = time_hosted(model, items, 3)
    assert timed["timed_prompts"] == 3 and max(server.stats.queue_waits) == 0, "one at a time: nobody queues"
    server.reset_stats()
    perf, sent = served_throughput(model, items, 4)
    assert perf["throughput_requests"] == 4 and len(server.stats.queue_waits) == 4
    assert max(server.stats.queue_waits) > 0, "four in flight at once: the single slot made some wait"
    assert sent.spent()["requests"] == 4 and sent.output_tokens > 0

    server.config.latency_s = 0.0
    server.reset_stats()
    server.config.faults = {1: "500"}
    failed, sent = served_throughput(model, items, 1)
    assert "500" in failed["throughput_error"] and "answers_per_s" not in failed, failed
    assert failed["throughput_requests"] == 0 and server.stats.total == 1, "no request starts after a failure"


def test_the_eval_spend_counts_the_paid_timing_requests_every_run(tmp_path, server, env_key, capsys):
    server.config.responder = lambda messages, index, body: "A"
    recipe = _served_recipe(tmp_path, server, "  timed_requests: 2\n")
    assert main(["run", str(recipe)]) == 0
    spend = json.loads((tmp_path / "out" / "results.json").read_text())["spend"]
    parts = {(p["model"], p["part"]): p for p in spend["parts"]}
    assert set(parts) == {(name, part) for name in ("teacher", "student") for part in ("answers", "timed requests")}
    timed, answers = parts[("teacher", "timed requests")], parts[("teacher", "answers")]
    assert timed["requests"] == 2 and timed["output_tokens"] > 0 and timed["cost_usd"] > 0, timed
    assert answers["requests"] == 4 and answers["cost_usd"] > 0, answers
    assert parts[("student", "timed requests")]["cost_usd"] == 0, "no price: its requests cost nothing"
    for key in ("requests", "input_tokens", "output_tokens"):
        assert spend["total"][key] == sum(p[key] for p in spend["parts"]), key
    assert spend["total"]["requests"] == 12
    assert spend["total"]["cost_usd"] == pytest.approx(timed["cost_usd"] + answers["cost_usd"], abs=1e-6)
    assert "spent by this eval: $" in capsys.readouterr().err
    student = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["student"]
    assert student["perf"]["usd_per_1k_answers"] is None, "a served model without a price or a throughput: unknown, not $0"
    assert student["frontier"]["cost_ratio"] is None

    # Run again: the answers come from the cache and cost nothing; the timed requests are paid again.
    assert main(["run", str(recipe)]) == 0
    spend = json.loads((tmp_path / "out" / "results.json").read_text())["spend"]
    parts = {(p["model"], p["part"]): p for p in spend["parts"]}
    assert parts[("teacher", "answers")]["requests"] == 0 and parts[("teacher", "answers")]["cost_usd"] == 0
    assert spend["total"]["cost_usd"] == pytest.approx(timed["cost_usd"], abs=1e-6) and spend["total"]["cost_usd"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "What this eval spent" in report and "of it on timed and throughput requests" in report, report
