"""The README's "Your own task in six steps", command by command, as a newcomer would run them: the commands are
read from the README itself, the recipe is a copy of the production recipe it names with the edits step 2 asks
for, and the only additions are what an offline test needs (the fake provider as the teacher's endpoint, a tiny
random Llama as the student, a few training steps)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import REPO, read_jsonl
from test_sft import tiny_student  # noqa: F401  (a module-scoped fixture: a 2-layer random Llama)

import apprentice_cli

STEPS = REPO / "README.md"
TASK = REPO / "data" / "tasks" / "math"


def readme_commands() -> list[str]:
    """The `apprentice …` commands of the six steps, in the order the README gives them."""
    text = STEPS.read_text(encoding="utf-8")
    steps = text.split("## Your own task in six steps", 1)[1].split("\n## ", 1)[0]
    return [" ".join(command.split()) for command in re.findall(r"`(apprentice [^`]+)`", steps)]


def test_the_six_steps_name_these_commands():
    assert readme_commands() == [
        "apprentice generate my-task.yaml --dry-run",
        "apprentice generate my-task.yaml --limit 20",
        "apprentice review runs/my-task",
        "apprentice generate my-task.yaml",
        "apprentice train my-task.yaml",
        "apprentice eval my-task.yaml",
    ]


def first_lines(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:count]]


@pytest.mark.slow
@pytest.mark.one_client  # the teacher paths are tested elsewhere; this is about the steps
def test_a_newcomer_follows_the_six_steps(tmp_path, server, env_key, tiny_student, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    # Step 1: prompts and a golden set of one's own (here: 40 of the math task's prompts, 8 of its golden items).
    prompts, golden = first_lines(TASK / "prompts.jsonl", 40), first_lines(TASK / "golden.jsonl", 8)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    (tmp_path / "golden.jsonl").write_text("".join(json.dumps(g) + "\n" for g in golden), encoding="utf-8")
    references = {p["prompt"]: p["reference"] for p in prompts} | {g["prompt"][-1]["content"]: g["reference"]
                                                                   for g in golden}

    def teacher(messages: list, index: int, body: dict) -> str:  # right, except the second sample of a few prompts
        question = messages[-1]["content"]
        wrong = index == 1 and len(question) % 3 == 0
        return f"Working it out.\nAnswer: {int(references[question]) + (1 if wrong else 0)}"

    server.config.responder = teacher

    # Step 2: copy the production recipe the README names and point it at one's files.
    recipe = yaml.safe_load((REPO / "data" / "recipes" / "openai-gpt4o-to-llama3b.yaml").read_text(encoding="utf-8"))
    recipe["factory"]["prompts"]["path"] = "prompts.jsonl"
    recipe["factory"]["output_dir"] = "runs/my-task"
    for check in recipe["factory"]["checks"]:
        if isinstance(check, dict) and check["name"] == "contamination":
            check["path"] = "golden.jsonl"
    recipe["sft"].update(data=["runs/my-task"], output_dir="runs/sft-my-task")
    recipe["eval"].update(golden=["golden.jsonl"], output_dir="runs/eval-my-task")
    (tmp_path / "my-task.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")

    offline = {  # what the test environment needs, given as a user would: --set overrides
        "generate": [f"factory.teacher.base_url={server.openai_base_url}", "factory.teacher.api_key_env=APPRENTICE_TEST_KEY"],
        "train": [f"sft.student={tiny_student}", "sft.qlora=false", "sft.max_length=48", "sft.max_steps=3",
                  "sft.eval_every_steps=3", "sft.per_device_batch_size=8", "sft.gradient_accumulation_steps=1",
                  "sft.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear}"],
        "eval": ["eval.perf_prompts=2", "eval.params={temperature: 0, max_tokens: 8}",
                 "eval.models=[{name: gpt-4o, role: teacher, provider: openai, model: gpt-4o, "
                 f"base_url: '{server.openai_base_url}', api_key_env: APPRENTICE_TEST_KEY}}, "
                 "{name: student, role: student, provider: local, model: runs/sft-my-task/merged}]"],
    }
    exits, requests = [], []
    for command in readme_commands():
        argv = shlex.split(command)[1:]
        for override in offline.get(argv[0], []):
            argv += ["--set", override]
        exits.append(apprentice_cli.main(argv))
        requests.append(server.stats.total)
        shown = capsys.readouterr()
        assert "Traceback" not in shown.out + shown.err, (command, shown.err[-2000:])

    run = tmp_path / "runs" / "my-task"
    assert exits[:5] == [0, 0, 0, 0, 0], exits
    assert requests[0] == 0, "step 3: the dry run sends nothing"
    assert requests[1] == 20, "step 4: the pilot asks for 20 prompts (n=2: one request each)"
    assert requests[3] == 40, "step 5: the full run resumes the pilot and asks only for the other 20"
    records = read_jsonl(run / "accepted.jsonl") + read_jsonl(run / "rejected.jsonl")
    assert len(records) == 80 and len({r["id"] for r in records}) == 80, "every sample once"
    assert any("number" in json.dumps(r) for r in read_jsonl(run / "rejected.jsonl")), "the wrong answers are rejected"
    assert (tmp_path / "runs" / "sft-my-task" / "adapter").is_dir(), "step 6: a trained student"
    results = json.loads((tmp_path / "runs" / "eval-my-task" / "results.json").read_text(encoding="utf-8"))
    assert "gpt-4o" in json.dumps(results) and "student" in json.dumps(results)
    assert exits[5] == 1, "the random student fails the gate, and the eval says so with exit code 1"
