"""Recipes and prompt files: every bad input names the file, line or key, and what to do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apprentice.errors import RecipeError
from factory.prompts import PromptError, check_prompts, iter_prompts
from factory.recipe import load_factory_config
from sft.config import load_sft_config

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_every_recipe_in_data_recipes_parses(tmp_path, monkeypatch):
    from factory.grid import write_grid

    monkeypatch.chdir(REPO)  # recipes name their files relative to the repository
    recipes = sorted((REPO / "data" / "recipes").glob("*.yaml"))
    assert recipes, "data/recipes/ holds no recipe"
    for path in recipes:
        config = load_factory_config(path)
        if config.prompts.grid is not None:  # the grid draws: its files exist and it has the combinations
            grid = config.prompts.grid
            drawn = write_grid(grid, tmp_path / path.stem).read_text(encoding="utf-8").count("\n")
            assert drawn == grid.count, path
        elif config.prompts.dataset is not None:
            assert Path(config.prompts.dataset.path).exists(), path
        else:
            assert config.prompts.path.exists(), path


def test_all_recipe_errors_are_reported_at_once_with_key_paths(tmp_path):
    recipe = write(
        tmp_path / "r.yaml",
        "factory:\n"
        "  output_dir: out\n"
        "  prompts: {path: p.jsonl, sytem: x}\n"
        "  samples_per_prompt: 0\n"
        "  teacher: {provider: openia, max_concurrency: -1}\n",
    )
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    assert str(recipe) in text
    for path in ("factory.prompts.sytem", "factory.samples_per_prompt", "factory.teacher.provider",
                 "factory.teacher.max_concurrency"):
        assert path in text, text
    assert "unknown key" in text


def test_set_overrides_use_yaml_values(tmp_path):
    recipe = write(tmp_path / "r.yaml", "factory:\n  prompts: {path: p.jsonl}\n")
    config = load_factory_config(recipe, ["factory.samples_per_prompt=3", "factory.teacher.params.temperature=0.1"])
    assert config.samples_per_prompt == 3
    assert config.teacher.params["temperature"] == 0.1
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_factory_config(recipe, ["factory.samples_per_prompt"])


def test_missing_factory_section_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no `factory:` section"):
        load_factory_config(write(tmp_path / "a.yaml", "sft: {}\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_factory_config(write(tmp_path / "b.yaml", "factory: [\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_factory_config(tmp_path / "missing.yaml")


def test_bad_prompt_lines_are_listed_with_file_and_line(tmp_path):
    lines = [
        json.dumps({"prompt": "fine"}),
        "{not json",
        json.dumps({"promt": "typo"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"prompt": [{"role": "robot", "content": "q"}]}),
        json.dumps({"id": "x", "prompt": "one"}),
        json.dumps({"id": "x", "prompt": "two"}),
        json.dumps({"prompt": "   "}),
    ]
    path = write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(PromptError) as info:
        check_prompts(path)
    text = str(info.value)
    assert "nothing was sent" in text
    for line, words in [(2, "not valid JSON"), (3, "unknown key"), (4, "last message"), (5, "role"),
                        (7, "duplicate id"), (8, "empty")]:
        assert f"{path}:{line}:" in text and words in text, (line, text)
    assert f"{path}:1:" not in text and f"{path}:6:" not in text


def test_prompts_stream_with_system_message_and_stable_ids(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps({"prompt": "hi", "attributes": {"t": 1}}) + "\n\n")
    assert check_prompts(path, "be brief") == 1
    first = list(iter_prompts(path, "be brief"))
    second = list(iter_prompts(path, "be brief"))
    assert first[0].messages[0] == {"role": "system", "content": "be brief"}
    assert first[0].id == second[0].id and first[0].attributes == {"t": 1}


def test_empty_or_missing_prompt_file(tmp_path):
    with pytest.raises(PromptError, match="no prompts"):
        check_prompts(write(tmp_path / "e.jsonl", "\n"))
    with pytest.raises(PromptError, match="not found"):
        check_prompts(tmp_path / "nope.jsonl")


def test_unknown_keys_suggest_the_closest_known_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("factory:\n  prompts: {path: p.jsonl}\n  samples_per_promt: 2\n"
                      "  teacher: {provider: openai, temprature: 1}\n"
                      "  checks: [empty, {name: regex, pattern: x, mdoe: must_match}, {name: judge, rubric: r, "
                      "teacher: {provider: openai, modle: gpt-4o}}]\n  colour: blue\n")
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    assert "factory.samples_per_promt: unknown key; did you mean `samples_per_prompt`?" in text
    assert "factory.teacher.temprature: unknown key" in text  # a sampling parameter goes in params: no guess
    assert "factory.checks.1.mdoe: unknown key; did you mean `mode`?" in text
    assert "factory.checks.2.teacher.modle: unknown key; did you mean" in text
    assert "factory.colour: unknown key (check the spelling" in text  # nothing close: no guess
    recipe.write_text("factory:\n  prompts: {path: p.jsonl}\nsft:\n  data: [runs/x]\n  lerning_rate: 1e-4\n")
    with pytest.raises(RecipeError, match=r"sft.lerning_rate: unknown key; did you mean `learning_rate`\?"):
        load_sft_config(recipe)
    recipe.write_text("factroy:\n  prompts: {path: p.jsonl}\n")
    with pytest.raises(RecipeError, match=r"factroy \(did you mean `factory`\?\)"):
        load_factory_config(recipe)
