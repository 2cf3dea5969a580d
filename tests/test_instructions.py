"""What the student forgot: the `instruction` metric (constraints checked by code, as IFEval does), the shipped
general set data/golden/instructions.jsonl, and `eval.regression` with `gate.max_regression` through the fake
provider."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apprentice.errors import RecipeError
from eval.__main__ import main
from eval.golden import load_golden
from eval.instructions import instruction

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "golden" / "instructions.jsonl"

# An answer that meets every constraint of each shipped item, and one that breaks them.
GOOD = {
    "if00": "Vast, blue, restless.", "if01": "teal", "if02": "HELLO", "if03": '{"name": "Ana", "age": 30}',
    "if04": "- apple\n- pear\n- plum", "if05": "The moon pulls the tides.", "if06": "I took my umbrella today.",
    "if07": "A cat is a small furry pet.", "if08": "Yes, water makes things wet.",
    "if09": "I say thank you and goodbye.", "if10": "- keep a schedule\n- avoid screens",
    "if11": "Coffee wakes me up early.", "if12": '```json\n{"city": "Paris"}\n```',
    "if13": "HELLO THERE, FRIEND!", "if14": "Tokyo", "if15": "Its leaves fall and its roots stay.",
    "if16": "A bicycle is a vehicle with two wheels and pedals.", "if17": "cold",
    "if18": '{"x": 1, "y": 2}', "if19": "Dear friend, I hope you are well.",
}


@pytest.mark.parametrize("answer,constraints,expected", [
    ("blue calm sea", {"words": 3}, 1.0),
    ("blue calm wide sea", {"words": 3}, 0.0),
    ("don't stop-now", {"words": 2}, 1.0),  # contractions and hyphenated words are one word each
    ("hello world", {"case": "lower"}, 1.0),
    ("Hello world", {"case": "lower"}, 0.0),
    ("123", {"case": "upper"}, 0.0),  # no letters: neither case followed
    ("Bring the Umbrella.", {"keywords": ["umbrella"]}, 1.0),
    ("umbrellas", {"keywords": ["umbrella"]}, 0.0),  # whole words only
    ("a dog barks", {"forbidden": ["dog"]}, 0.0),
    ('{"a": 1, "b": 2}', {"json_keys": ["b", "a"]}, 1.0),
    ('{"a": 1}', {"json_keys": ["a", "b"]}, 0.0),
    ("not json", {"json_keys": ["a"]}, 0.0),
    ("- one\n* two\nthree", {"bullets": 2}, 1.0),
    ("Yes.", {"starts_with": "yes", "ends_with": "."}, 1.0),
    ("blue calm sea", {"words": 3, "case": "upper"}, 0.0),  # strict: every constraint
])
def test_each_constraint_by_hand(answer, constraints, expected):
    assert instruction(answer, constraints) == expected, (answer, constraints)


def test_the_shipped_set_loads_and_its_checks_tell_good_answers_from_bad():
    items = load_golden([SHIPPED], ["normalized"])
    assert len(items) == 20 and all(item.metrics == ["instruction"] for item in items)
    assert set(GOOD) == {item.id for item in items}
    for item in items:
        assert instruction(GOOD[item.id], item.reference) == 1.0, (item.id, item.reference, GOOD[item.id])
        assert instruction("I am not sure about that.", item.reference) == 0.0, item.id


def test_a_misspelt_constraint_is_named_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "reference": {"word": 3}, "metric": "instruction"}) + "\n"
                    + json.dumps({"prompt": "p", "reference": {"case": "title"}, "metric": "instruction"}) + "\n")
    with pytest.raises(RecipeError) as caught:
        load_golden([path], ["normalized"])
    message = str(caught.value)
    assert f"{path}:1: metric instruction: unknown constraint 'word'; known: words," in message, message
    assert f"{path}:2: metric instruction: case must be one of ('lower', 'upper'), not 'title'" in message, message


def _responder(messages, index, body):
    """base and teacher follow the instructions; the student lost it (it answers the task only)."""
    question = messages[-1]["content"]
    if question.startswith("task"):
        return question.split()[-1]
    if body["model"] == "student-model":
        return "I am not sure about that."
    return {"Describe the sea in exactly three words.": "Vast, blue, restless.",
            "Name the capital of Japan in one word.": "Tokyo"}.get(question, "Yes.")


def _recipe(tmp_path: Path, server, gate: str) -> Path:
    golden = tmp_path / "task.jsonl"
    golden.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"task {i}", "reference": str(i)}) + "\n"
                              for i in range(3)))
    hosted = f"base_url: '{server.openai_base_url}', api_key_env: APPRENTICE_TEST_KEY, provider: openai"
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "eval:\n"
        f"  output_dir: {tmp_path / 'out'}\n"
        f"  golden: [{golden}]\n"
        f"  regression: [{SHIPPED}]\n"
        "  bootstrap: 100\n"
        f"  gate: {gate}\n"
        "  models:\n"
        f"    - {{name: teacher, role: teacher, model: teacher-model, {hosted}}}\n"
        f"    - {{name: base, role: baseline, model: base-model, {hosted}}}\n"
        f"    - {{name: student, role: student, model: student-model, {hosted}}}\n", encoding="utf-8")
    return recipe


@pytest.mark.one_client
def test_a_student_that_forgot_how_to_follow_instructions_fails_max_regression(tmp_path, server, env_key):
    server.config.responder = _responder
    recipe = _recipe(tmp_path, server, "{min_retention: 0.9, max_regression: 0.05}")
    assert main(["run", str(recipe)]) == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"]["student"]["metrics"]["overall"]["mean"] == 1.0, "the task is not the regression set"
    found = results["regression"]
    assert found["base"] == "base" and found["models"]["base"]["mean"] == pytest.approx(0.15), "3 of 20 by hand"
    assert found["models"]["student"]["mean"] == 0.0 and found["models"]["student"]["change"] == pytest.approx(-0.15)
    assert results["gate"]["reason"] == "student: lost 15.0 points on the regression sets > max_regression 5"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## What the student forgot" in report and "student lost 15.0 points on the regression sets" in report
    assert "| student (student) | 0.0 % [" in report and "-15.0 points" in report
    assert main(["run", str(recipe), "--set", "eval.gate.max_regression=0.2"]) == 0, "within the allowance"


@pytest.mark.one_client
def test_max_regression_without_a_base_or_a_regression_set_fails_saying_what_to_set(tmp_path, server, env_key, capsys):
    server.config.responder = _responder
    recipe = _recipe(tmp_path, server, "{min_retention: 0.9, max_regression: 0.05}")
    recipe.write_text(recipe.read_text().replace("role: baseline", "role: other"))
    assert main(["run", str(recipe)]) == 1
    reason = json.loads((tmp_path / "out" / "results.json").read_text())["gate"]["reason"]
    assert reason == "student: regression undefined (no base model: set eval.base or give one model role: baseline)"
    assert main(["run", str(recipe), "--set", "eval.regression=[]"]) == 1
    reason = json.loads((tmp_path / "out" / "results.json").read_text())["gate"]["reason"]
    assert "no regression score (set eval.regression, e.g. [data/golden/instructions.jsonl])" in reason, reason
    capsys.readouterr()
    clash = tmp_path / "other" / "task.jsonl"  # the same set name and id as a task item
    clash.parent.mkdir()
    clash.write_text(json.dumps({"id": "t0", "prompt": "p", "reference": {"words": 1}}) + "\n")
    assert main(["run", str(recipe), "--set", f"eval.regression=[{clash}]"]) == 2
    assert "have the keys of eval.golden items (set/id); rename the file or the ids" in capsys.readouterr().err
