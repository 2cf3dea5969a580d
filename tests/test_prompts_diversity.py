"""Diversity sampling: per-sample sampling parameters drawn from ranges, prompts from a dataset, and
self-instruct expansion; runs go through the real openai SDK against the fake server."""
from __future__ import annotations

import pytest

from conftest import read_jsonl, write_prompts, write_recipe
from factory.__main__ import main
from factory.recipe import FactoryConfig, ParamRanges, RecipeError, load_factory_config


# ---- sampling parameters drawn from ranges ----------------------------------------------------------------
def test_param_range_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "factory:\n"
        "  prompts: {path: p.jsonl}\n"
        "  teacher:\n"
        "    provider: openai\n"
        "    param_ranges: {temperature: [1.1, 0.3], top_p: [0.0, 1.0], min_p: [0, 1], top_k: [0.5, 2]}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    assert "factory.teacher.param_ranges.temperature: Value error, [1.1, 0.3]: low must not exceed high" in text
    assert "factory.teacher.param_ranges.top_p: Value error, [0.0, 1.0]: values must lie in (0, 1]" in text
    assert "factory.teacher.param_ranges.min_p: unknown key" in text
    assert "factory.teacher.param_ranges.top_k" in text  # an integer range
    recipe.write_text(
        "factory:\n"
        "  prompts: {path: p.jsonl}\n"
        "  teacher: {provider: anthropic, param_ranges: {frequency_penalty: [0, 1]}}\n"
    )
    with pytest.raises(RecipeError, match=r"factory.teacher: .*param_ranges.frequency_penalty: provider anthropic"):
        load_factory_config(recipe)


def test_draws_are_seeded_by_prompt_and_sample_rounded_and_in_range():
    ranges = ParamRanges(temperature=(0.3, 1.1), top_p=(0.8, 1.0), top_k=(5, 50))
    first = ranges.draw("p1", 0)
    assert first == ranges.draw("p1", 0) == ParamRanges(**ranges.model_dump()).draw("p1", 0)
    draws = [ranges.draw(f"p{i}", s) for i in range(50) for s in range(2)]
    assert len({d["temperature"] for d in draws}) > 40
    for d in draws:
        assert 0.3 <= d["temperature"] <= 1.1 and 0.8 <= d["top_p"] <= 1.0 and isinstance(d["top_k"], int)
        assert d["temperature"] == round(d["temperature"], 3)


def test_param_ranges_enter_the_fingerprint_only_when_set():
    prompts = {"path": "p.jsonl"}
    plain = FactoryConfig(prompts=prompts)
    assert "param_ranges" not in plain.fingerprint()
    assert plain.fingerprint_hash() == "923547f39b9867c6"  # as before param_ranges existed
    ranged = FactoryConfig(prompts=prompts, teacher={"param_ranges": {"temperature": [0.3, 1.1]}})
    assert ranged.fingerprint()["param_ranges"] == {"temperature": [0.3, 1.1]}
    assert ranged.fingerprint_hash() != plain.fingerprint_hash()


def test_each_sample_sends_and_records_its_own_draw_and_resumes(tmp_path, server, env_key):
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 4), provider="openai",
        base_url=server.openai_base_url, n=3,
        extra_teacher="    param_ranges: {temperature: [0.3, 1.1], top_p: [0.8, 1.0]}\n",
    )
    assert main(["generate", str(recipe)]) == 0
    bodies = server.stats.snapshot()["bodies"]
    assert len(bodies) == 12 and all("n" not in body for body in bodies)  # one request per sample
    sent = {(body["messages"][-1]["content"], body["temperature"], body["top_p"]) for body in bodies}
    records = read_jsonl(run / "accepted.jsonl")
    assert len(records) == 12
    recorded = set()
    for record in records:
        params = record["teacher"]["params"]
        assert params["max_tokens"] == 64 and 0.3 <= params["temperature"] <= 1.1 and 0.8 <= params["top_p"] <= 1
        recorded.add((record["prompt"][-1]["content"], params["temperature"], params["top_p"]))
    assert recorded == sent and len({t for _, t, _ in sent}) > 6
    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0  # the same draws, the same bodies: all done already
    assert server.stats.total == 0
    (run / "accepted.jsonl").unlink()  # records gone: the cache must still know every drawn body
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 0 and len(read_jsonl(run / "accepted.jsonl")) == 12
