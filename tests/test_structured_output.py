"""`teacher.structured_output`: answers that are one JSON object matching a schema, through the real SDKs
against the fake server (OpenAI's strict json_schema response_format, Anthropic's forced tool), online and
through the Batch APIs."""
from __future__ import annotations

import json

import pytest
from helpers import read_jsonl, write_prompts, write_recipe

from apprentice.errors import RecipeError
from factory.__main__ import main
from factory.recipe import TeacherConfig, load_factory_config
from factory.teachers.openai import OpenAITeacher

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}
STRUCTURED = f"    structured_output: {{name: city_facts, json_schema: {json.dumps(SCHEMA)}}}\n"


def test_structured_output_is_for_providers_that_have_it_and_in_the_fingerprint(tmp_path):
    base = "factory:\n  prompts: {path: p.jsonl}\n  teacher:\n"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(base + "    provider: local\n"
                      "    structured_output: {name: 'bad name', json_schema: {type: array}}\n")
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    for expected in ("factory.teacher.structured_output.name: String should match pattern",
                     "factory.teacher.structured_output.json_schema: Value error, the schema must describe an object"):
        assert expected in text, text
    recipe.write_text(base + "    provider: vllm\n    structured_output: {name: ok, json_schema: {type: object}}\n")
    with pytest.raises(RecipeError, match="provider vllm cannot constrain its answers to a schema"):
        load_factory_config(recipe)

    recipe.write_text(base + "    provider: openai\n    model: gpt-4o\n")
    plain = load_factory_config(recipe).fingerprint()
    assert "structured_output" not in plain, "runs without structured output keep the fingerprints they had"
    recipe.write_text(base + "    provider: openai\n    model: gpt-4o\n" + STRUCTURED)
    assert load_factory_config(recipe).fingerprint()["structured_output"] == {
        "name": "city_facts", "description": "", "json_schema": SCHEMA}


@pytest.mark.parametrize("provider, mode", [("openai", "online"), ("anthropic", "online"),
                                            ("openai", "batch"), ("anthropic", "batch")])
def test_answers_are_the_json_the_schema_asks_for(tmp_path, server, env_key, provider, mode):
    server.config.batch_delay_s = 0.05
    def responder(messages: list, index: int, body: dict) -> dict:
        assert body.get("response_format") or body.get("tool_choice"), "every request asks for the schema"
        return {"city": messages[-1]["content"], "population": index + 1}

    server.config.responder = responder
    run = tmp_path / "run"
    batch = "    mode: batch\n    batch: {poll_s: 0.05, poll_max_s: 0.2}\n" if mode == "batch" else ""
    url = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 3),
                          provider=provider, base_url=url, extra_teacher=STRUCTURED + batch,
                          extra="  checks: [empty, truncated]\n")
    assert main(["generate", str(recipe)]) == 0
    body = server.stats.bodies[0] if mode == "online" else None
    if body is not None and provider == "openai":
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "city_facts", "strict": True, "schema": SCHEMA}}
    elif body is not None:
        assert body["tools"] == [
            {"name": "city_facts", "description": "Record the city_facts.", "input_schema": SCHEMA}]
        assert body["tool_choice"] == {"type": "tool", "name": "city_facts"}
    accepted = sorted(read_jsonl(run / "accepted.jsonl"), key=lambda r: r["prompt_id"])
    assert [json.loads(r["completion"][0]["content"]) for r in accepted] == [
        {"city": f"question {i}", "population": 1} for i in range(3)]
    # a forced tool call ends the answer as a stop does: the truncated check passes it
    assert {r["finish_reason"] for r in accepted} == {"stop"}
    assert read_jsonl(run / "rejected.jsonl") == []


def test_an_openai_refusal_is_the_answer_text_not_an_empty_answer():
    """A model that declines a structured answer sends `refusal` and no content: the refusal check sees why."""
    teacher = OpenAITeacher(TeacherConfig(provider="openai", model="gpt-4o", base_url="http://127.0.0.1:9/v1"))
    data = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}]}
    assert teacher.parse(data).choices[0].text == "I can't help with that."
