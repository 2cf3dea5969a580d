"""Attribute grids: sampling without replacement, weights, recipe errors, and a run whose records carry
their attributes (through the real openai SDK against the fake server)."""
from __future__ import annotations

from collections import Counter

import pytest
from helpers import read_jsonl
from pydantic import ValidationError

from factory.__main__ import main
from factory.grid import sample
from factory.prompt_config import GridConfig, PromptsConfig


def test_draws_are_distinct_seeded_and_cover_everything_without_count():
    grid = GridConfig(template="{a} {b}", attributes={"a": ["x", "y", "z"], "b": ["1", "2"]})
    everything = sample(grid)
    assert sorted(map(tuple, everything)) == [(a, b) for a in range(3) for b in range(2)]
    some = GridConfig(template="{a} {b}", attributes={"a": ["x", "y", "z"], "b": ["1", "2"]}, count=4, seed=3)
    assert len({tuple(p) for p in sample(some)}) == 4 and sample(some) == sample(some)


def test_weights_bias_the_draw():
    grid = GridConfig(template="{a} {b}", count=100, attributes={
        "a": {"values": ["rare", "common"], "weights": [1, 20]}, "b": [str(i) for i in range(100)]})
    counts = Counter(picks[0] for picks in sample(grid))
    assert counts[1] > 3 * counts[0]


def test_grid_errors_name_the_problem(tmp_path):
    with pytest.raises(ValidationError, match=r"template uses \['c'\]"):
        GridConfig(template="{a} {c}", attributes={"a": ["x"]})
    with pytest.raises(ValidationError, match=r"attributes \['b'\] do not appear"):
        GridConfig(template="{a}", attributes={"a": ["x"], "b": ["y"]})
    with pytest.raises(ValidationError, match="either path"):
        PromptsConfig()
    with pytest.raises(ValidationError, match="either path"):
        PromptsConfig(path="p.jsonl", grid={"template": "{a}", "attributes": {"a": ["x"]}})
    bad = GridConfig(template="{a}", attributes={"a": {"values": ["x", "y"], "weights": [1]}})
    with pytest.raises(ValueError, match=r"grid.attributes.a.weights"):
        sample(bad)
    missing = GridConfig(template="{a}", attributes={"a": {"path": str(tmp_path / "nope.txt")}})
    with pytest.raises(ValueError, match="nope.txt not found"):
        sample(missing)


def test_a_grid_run_carries_attributes_and_resumes(tmp_path, server, env_key):
    personas = tmp_path / "personas.txt"
    personas.write_text("a pirate\n\na chef\n")
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        "  prompts:\n"
        "    grid:\n"
        "      template: 'Explain {topic} as {persona}.'\n"
        f"      attributes: {{topic: [tides, taxes, yeast], persona: {{path: {personas}}}}}\n"
        "      count: 5\n"
        f"  teacher: {{provider: openai, model: gpt-4o-mini, base_url: '{server.openai_base_url}', "
        "api_key_env: APPRENTICE_TEST_KEY}\n"
    )
    assert main(["generate", str(recipe)]) == 0
    records = read_jsonl(run / "accepted.jsonl")
    assert len(records) == 5 and len({r["prompt_id"] for r in records}) == 5
    for record in records:
        attributes = record["attributes"]
        assert set(attributes) == {"topic", "persona"}
        assert record["prompt"][-1]["content"] == f"Explain {attributes['topic']} as {attributes['persona']}."
    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0  # the same seed draws the same prompts: nothing to send
    assert server.stats.total == 0
    recipe.write_text(recipe.read_text().replace("[tides, taxes, yeast]", "[tides, {oops: 1}]"))
    assert main(["generate", str(recipe)]) == 2
