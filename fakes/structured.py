"""Structured output in the fake: OpenAI's `response_format` and Anthropic's `tools` / `tool_choice`.

A request that asks for a JSON answer is checked as the providers check it (a 400 names what is wrong):
OpenAI `response_format` is `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema":
{"name", "schema", "strict"?, "description"?}}`, and a strict schema must list every property in `required`
and set `additionalProperties: false` on every object; Anthropic `tools` are `{"name", "input_schema"
(an object schema), "description"?}` and `tool_choice` is auto, any, none or `{"type": "tool", "name"}` of
a listed tool.

The answer: a responder may return a dict (or any JSON value), sent as JSON text. Where the request
constrains the answer (a strict json_schema; a tool the model must call), the answer must match the
schema, as the real model's does; one that does not is a 500 naming the mismatch, so a test's responder
cannot pass off text the real API would never send. An Anthropic request that forces a tool is answered
with one `tool_use` block whose input is the answer, `stop_reason: "tool_use"`.

Only the schema keywords the fake checks are understood: type, properties, required, additionalProperties,
items, enum. Stdlib only.
"""
from __future__ import annotations

import json
import re
from typing import Any

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,), "number": (int, float),
    "boolean": (bool,), "null": (type(None),),
}


def request_problem(provider: str, body: dict) -> str | None:
    """The message of the 400 this request's structured-output fields get, or None when they are fine."""
    if provider == "openai":
        return _response_format_problem(body.get("response_format"))
    return _tools_problem(body.get("tools"), body.get("tool_choice"))


def required_schema(provider: str, body: dict) -> dict | None:
    """The schema the answer is held to: OpenAI's strict json_schema, or the tool Anthropic must call."""
    if provider == "openai":
        response_format = body.get("response_format") or {}
        spec = response_format.get("json_schema") or {}
        return spec["schema"] if response_format.get("type") == "json_schema" and spec.get("strict") else None
    tool = forced_tool(body)
    return tool["input_schema"] if tool is not None else None


def forced_tool(body: dict) -> dict | None:
    """The tool an Anthropic request makes the model call (`tool_choice` tool, or any of one tool)."""
    choice, tools = body.get("tool_choice") or {}, body.get("tools") or []
    if choice.get("type") == "tool":
        return next(tool for tool in tools if tool["name"] == choice["name"])
    if choice.get("type") == "any" and tools:
        return tools[0]
    return None


def answer_value(text: str, schema: dict) -> tuple[Any, str | None]:
    """(the answer as JSON, None) when it matches `schema`; (None, why not) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None, f"the answer is not JSON: {text[:80]!r}"
    problem = mismatch(value, schema)
    return (None, f"the answer does not match the schema: {problem}") if problem else (value, None)


def mismatch(value: Any, schema: dict, path: str = "$") -> str | None:
    """Where `value` breaks `schema` (the keywords above), or None."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(_is(value, name) for name in kinds):
        return f"{path} is not of type {kind}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} is not one of {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        missing = [name for name in schema.get("required") or [] if name not in value]
        if missing:
            return f"{path} lacks {missing}"
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                return f"{path} has properties the schema does not allow: {extra}"
        for name, item in value.items():
            if name in properties:
                problem = mismatch(item, properties[name], f"{path}.{name}")
                if problem:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = mismatch(item, schema["items"], f"{path}[{i}]")
            if problem:
                return problem
    return None


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES.get(name, (object,)))


def _response_format_problem(response_format: Any) -> str | None:
    if response_format is None:
        return None
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(response_format, dict) or response_format.get("type") not in kinds:
        return "response_format.type must be one of text, json_object, json_schema"
    if response_format["type"] != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        return "response_format.json_schema.name must match ^[a-zA-Z0-9_-]{1,64}$"
    if not isinstance(spec.get("schema"), dict):
        return "response_format.json_schema.schema: an object is required"
    if spec.get("strict"):
        return _strict_problem(spec["schema"], "response_format.json_schema.schema")
    return None


def _strict_problem(schema: dict, path: str) -> str | None:
    """OpenAI's strict mode: every object lists all its properties as required and allows no others."""
    if schema.get("type") == "object":
        properties = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            return f"Invalid schema for strict mode: {path}: additionalProperties must be false"
        if sorted(schema.get("required") or []) != sorted(properties):
            return f"Invalid schema for strict mode: {path}: 'required' must list every property"
        for name, item in properties.items():
            problem = _strict_problem(item, f"{path}.properties.{name}")
            if problem:
                return problem
    if isinstance(schema.get("items"), dict):
        return _strict_problem(schema["items"], f"{path}.items")
    return None


def _tools_problem(tools: Any, choice: Any) -> str | None:
    if tools is None:
        return "tool_choice: tools are required" if choice is not None else None
    if not isinstance(tools, list) or not tools:
        return "tools: a non-empty list is required"
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not _NAME.match(tool["name"]):
            return f"tools.{i}.name must match ^[a-zA-Z0-9_-]{{1,64}}$"
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{i}.input_schema: a JSON schema of type object is required"
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        return "tool_choice.type must be one of auto, any, tool, none"
    if choice["type"] == "tool" and choice.get("name") not in {tool["name"] for tool in tools}:
        return f"tool_choice.name: no tool named {choice.get('name')!r}"
    return None
