"""The production recipes are experiments worth copying: each has a task of its own (prompts and a golden set
that data/tasks/make_tasks.py writes), the checks that task needs, a contamination check against its own golden
set that finds nothing, the same instruction for the teacher's prompts and the golden prompts, and a dry run
that counts and prices it without sending a request."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import REPO

from eval.config import load_eval_config
from eval.golden import load_golden
from factory.__main__ import main as factory_main
from factory.recipe import load_factory_config
from factory.records import Sample
from quality_checks import build_checks

PRODUCTION = ["anthropic-claude-to-llama3b", "openai-batch-100k", "openai-gpt4o-to-llama3b",
              "vllm-70b-distill-to-llama3b"]
TASKS = REPO / "data" / "tasks"


def test_the_task_files_are_what_the_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tasks", TASKS / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    committed = sorted(p.relative_to(TASKS).as_posix() for p in TASKS.rglob("*.jsonl"))
    assert written == committed
    for name in written:
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), f"data/tasks/{name} differs: rerun the script"


def test_the_production_recipes_are_the_ones_named_here():
    assert sorted(p.stem for p in (REPO / "data" / "recipes").glob("*.yaml")) == sorted(PRODUCTION + ["demo"])


def _training_prompts(config, tmp_path: Path) -> list[dict]:
    prompts = config.prompts
    if prompts.path is not None:
        return [json.loads(line) for line in prompts.path.read_text(encoding="utf-8").splitlines()]
    if prompts.dataset is not None:
        rows = [json.loads(line) for line in Path(prompts.dataset.path).read_text(encoding="utf-8").splitlines()]
        return [{"id": row[prompts.dataset.id_column], "prompt": row[prompts.dataset.column]} for row in rows]
    from factory.grid import write_grid

    return [json.loads(line) for line in write_grid(prompts.grid, tmp_path).read_text(encoding="utf-8").splitlines()]


# The batch recipe's grid draws 50,000 prompts: seconds, so it runs with the slow tests.
PRODUCTION_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name == "openai-batch-100k" else name
                     for name in PRODUCTION]


@pytest.mark.parametrize("name", PRODUCTION_PARAMS)
def test_each_production_recipe_has_its_own_task_and_no_contamination(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their files relative to the repository
    path = REPO / "data" / "recipes" / f"{name}.yaml"
    factory, evaluation = load_factory_config(path), load_eval_config(path)
    assert all(Path(golden).is_relative_to("data/tasks") for golden in evaluation.golden), "a golden set of its task"
    contamination = [check for check in factory.checks if getattr(check, "name", check) == "contamination"]
    assert [check.path for check in contamination] == list(evaluation.golden), \
        "the contamination check reads the recipe's own golden set"
    golden = load_golden(evaluation.golden, evaluation.metrics)
    assert len(golden) >= 10
    system = factory.prompts.system
    for item in golden:  # every model at eval is asked as the teacher was: the same instruction
        asked = item.messages[0]["content"] if item.messages[0]["role"] == "system" else None
        assert asked == system, f"{item.id}: the golden prompt's instruction differs from factory.prompts.system"

    # The recipe's contamination check, run on every training prompt: none is near a golden prompt.
    check = build_checks(contamination)[0]
    prompts = _training_prompts(factory, tmp_path)
    assert len(prompts) >= 200
    flagged = []
    for row in prompts:
        sample = Sample(id=str(row["id"]), prompt=[{"role": "user", "content": row["prompt"]}],
                        completion=[{"role": "assistant", "content": "x"}], teacher={})
        if not check(sample).passed:
            flagged.append(row["id"])
    assert not flagged, f"{len(flagged)} training prompts are near a golden prompt: {flagged[:5]}"


def test_the_task_references_pass_the_recipes_own_reference_checks(monkeypatch):
    """The teacher is judged by the reference check: the task's references must read as its mode expects."""
    monkeypatch.chdir(REPO)
    for name in ("openai-gpt4o-to-llama3b", "anthropic-claude-to-llama3b", "vllm-70b-distill-to-llama3b"):
        factory = load_factory_config(REPO / "data" / "recipes" / f"{name}.yaml")
        reference = [c for c in factory.checks if getattr(c, "name", c) == "reference"]
        check = build_checks(reference)[0]
        evaluation = load_eval_config(REPO / "data" / "recipes" / f"{name}.yaml")
        for item in load_golden(evaluation.golden, evaluation.metrics):
            answer = f"Working it out.\nAnswer: {item.reference}" if reference[0].mode == "number" else item.reference
            sample = Sample(id=item.id, prompt=[{"role": "user", "content": "q"}],
                            completion=[{"role": "assistant", "content": answer}], teacher={}, reference=item.reference)
            assert check(sample).passed, (name, item.id)


@pytest.mark.parametrize("name", PRODUCTION_PARAMS)
def test_a_dry_run_of_each_production_recipe_counts_and_prices_it(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    for variable in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "VLLM_API_KEY"):
        monkeypatch.setenv(variable, "sk-test-not-a-key")
    output = tmp_path / "run"
    assert factory_main(["generate", str(REPO / "data" / "recipes" / f"{name}.yaml"), "--dry-run",
                         "--set", f"factory.output_dir={output}"]) == 0
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "request" in text and not output.exists(), text
    if name != "vllm-70b-distill-to-llama3b":  # a self-hosted model has no list price
        assert "$" in text, text
