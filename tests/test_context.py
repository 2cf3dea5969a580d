"""teacher.context: instructions and few-shot turns the teacher sees and the records (the student) do not."""
from __future__ import annotations

import pytest
from helpers import read_jsonl, write_prompts, write_recipe

from factory.__main__ import main
from factory.recipe import TeacherConfig

CONTEXT = (
    "    context:\n"
    "      - {role: system, content: Reply in JSON.}\n"
    "      - {role: user, content: Ann lives in Rome.}\n"
    "      - {role: assistant, content: '{\"name\": \"Ann\"}'}\n"
)


def test_context_goes_to_the_teacher_not_into_the_record(tmp_path, server, env_key):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, extra_teacher=CONTEXT)
    assert main(["generate", str(recipe), "--set", "factory.prompts.system=Be brief."]) == 0
    bodies = server.stats.bodies
    assert len(bodies) == 3
    for body in bodies:
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["system", "user", "assistant", "user"]
        assert body["messages"][0]["content"] == "Reply in JSON.\n\nBe brief."  # one system message, merged
    for record in read_jsonl(run / "accepted.jsonl"):
        assert record["prompt"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": record["prompt"][-1]["content"]}]

    # The context decides what the teacher answers: changing it is a different run.
    changed = recipe.read_text().replace("Reply in JSON.", "Reply in YAML.")
    recipe.write_text(changed)
    assert main(["generate", str(recipe), "--set", "factory.prompts.system=Be brief."]) == 2


def test_context_without_system_in_the_prompt_and_bad_messages():
    config = TeacherConfig(context=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert [m["role"] for m in config.with_context([{"role": "user", "content": "q"}])] == ["user", "assistant", "user"]
    kept = config.with_context([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    assert [m["role"] for m in kept] == ["system", "user", "assistant", "user"]
    with pytest.raises(ValueError, match=r"context\[0\]"):
        TeacherConfig(context=[{"role": "robot", "content": "x"}])
