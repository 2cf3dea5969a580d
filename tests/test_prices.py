"""Prices from the genai-prices table, prompt-cache tokens billed at their own prices, and the recipe's override:
through the real openai and anthropic SDKs against the fake server's prompt cache."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import genai_prices
import pytest
from helpers import PYTHON, REPO, read_jsonl, write_prompts, write_recipe

from apprentice.responses import Choice, TeacherResponse
from factory.__main__ import main
from factory.pricing import Pricer, Rates, lookup
from factory.recipe import TeacherConfig

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}
CONTEXT = "Rules of the house. " * 200  # 4,000 characters: 1,000 tokens at the fake


def table_cost(provider: str, usage: dict) -> float:
    """What genai-prices itself says the record's tokens cost."""
    tokens = genai_prices.Usage(input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"],
                                cache_read_tokens=usage.get("cached_input_tokens", 0),
                                cache_write_tokens=usage.get("cache_write_tokens", 0))
    return float(genai_prices.calc_price(tokens, MODELS[provider], provider_id=provider).total_price)


def uncached_cost(provider: str, usage: dict) -> float:
    return table_cost(provider, {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"]})


def test_table_prices_match_genai_prices_with_cache_tokens_and_long_context_tiers():
    for provider, model in [("openai", "gpt-4o-2024-08-06"), ("anthropic", "claude-sonnet-4-5-20250929")]:
        pricer = Pricer(lookup(model, provider))
        for total in (2_000, 300_000):  # Anthropic bills a request over 200k input tokens at higher rates
            usage = genai_prices.Usage(input_tokens=total, cache_read_tokens=1_200, cache_write_tokens=300,
                                       output_tokens=80)
            expected = float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)
            assert pricer.cost(total, 80, 1_200, 300) == pytest.approx(expected, rel=1e-12), (model, total)
    assert lookup("no-such-model", "openai") is None


def test_the_table_is_read_offline():
    guard = ("import socket\n"
             "def refuse(*args, **kwargs): raise OSError('network used')\n"
             "socket.socket.connect = socket.socket.connect_ex = refuse\n"
             "socket.create_connection = refuse\n"
             "from factory.pricing import lookup\n"
             "from genai_prices import data_snapshot\n"
             "rates = lookup('gpt-4o', 'openai')\n"
             "assert rates.input == 2.5 and rates.cached_input == 1.25, rates\n"
             "assert data_snapshot._custom_snapshot is None, 'prices were fetched'\n")
    done = subprocess.run([PYTHON, "-c", guard], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_recipe_price_defaults_never_under_count_and_the_batch_discount_scales_every_rate():
    rates = Rates.of(2.0, 8.0)
    assert (rates.cached_input, rates.cache_write) == (2.0, 2.5)
    half = Pricer(Rates.of(2.0, 8.0, cached_input=0.5, cache_write=2.5), 0.5)
    assert half.cost(1_000_000, 0, 600_000, 100_000) == pytest.approx(0.5 * (0.3 * 2.0 + 0.6 * 0.5 + 0.1 * 2.5))
    assert half.worst(1_000_000, 1_000_000) == pytest.approx(0.5 * (2.5 + 8.0))
    config = TeacherConfig(provider="anthropic", model="m", price={"input": 3, "output": 15, "cached_input": 0.3})
    assert config.price.cached_input == 0.3 and config.price.cache_write is None


def test_cache_entries_written_before_the_cache_counts_still_load():
    old = {"choices": [["text", "stop"]], "input_tokens": 10, "output_tokens": 2}
    response = TeacherResponse.from_cache(old)
    assert (response.cached_input_tokens, response.cache_write_tokens) == (0, 0)
    assert response.to_cache() == old, "an answer without prompt caching is cached byte for byte as before"
    cached = TeacherResponse([Choice("text", "stop")], 10, 2, cached_input_tokens=8)
    assert TeacherResponse.from_cache(cached.to_cache()).cached_input_tokens == 8


def context_recipe(tmp_path: Path, server, provider: str, name: str, prompts: int, budget: float | None = None) -> Path:
    base_url = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    extra = f"  budget_usd: {budget}\n" if budget is not None else ""
    return write_recipe(tmp_path / f"{name}.yaml", output_dir=tmp_path / name,
                        prompts=write_prompts(tmp_path / "p.jsonl", prompts), provider=provider, base_url=base_url,
                        model=MODELS[provider], extra=extra,
                        extra_teacher=f"    context: [{{role: system, content: '{CONTEXT}'}}]\n"
                                      "    max_concurrency: 1\n")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_repeated_context_costs_less_by_the_table_and_the_budget_counts_the_lower_cost(tmp_path, server, env_key,
                                                                                          provider):
    server.config.prompt_cache_min_tokens = 500
    assert main(["generate", str(context_recipe(tmp_path, server, provider, "free", 20))]) == 0
    records = read_jsonl(tmp_path / "free" / "accepted.jsonl")
    assert len(records) == 20
    cached = [r["usage"].get("cached_input_tokens", 0) for r in records]
    assert sorted(cached)[1:] == [1000] * 19, f"after the first, every request reads the context cached: {cached}"
    if provider == "anthropic":
        assert sum(r["usage"].get("cache_write_tokens", 0) for r in records) == 1000, "written once"
    for record in records:
        assert record["usage"]["cost_usd"] == pytest.approx(table_cost(provider, record["usage"]), rel=1e-9)
    cost = sum(r["usage"]["cost_usd"] for r in records)
    full = sum(uncached_cost(provider, r["usage"]) for r in records)
    assert cost < 0.7 * full, f"the cached context is billed at its price: {cost} vs {full} uncached"
    manifest = json.loads((tmp_path / "free" / "manifest.json").read_text())
    assert manifest["this_run"]["cost_usd"] == pytest.approx(cost, abs=1e-6)
    assert manifest["this_run"]["cached_input_tokens"] == sum(cached)

    # A budget between the two: the run whose context is cached finishes, the same run uncached cannot.
    budget = round((cost + full) / 2, 6)
    assert main(["generate", str(context_recipe(tmp_path, server, provider, "cached", 20, budget))]) == 0
    spent = json.loads((tmp_path / "cached" / "manifest.json").read_text())["totals"]["cost_usd"]
    assert spent <= budget and len(read_jsonl(tmp_path / "cached" / "accepted.jsonl")) == 20
    server.config.prompt_cache_min_tokens = None
    assert main(["generate", str(context_recipe(tmp_path, server, provider, "uncached", 20, budget))]) == 1
    assert json.loads((tmp_path / "uncached" / "manifest.json").read_text())["status"] == "budget_exhausted"
