"""The two request paths of the hosted teachers, side by side against the fake server: `teacher.client: raw`
(factory/teachers/wire.py) sends what `sdk` sends, reads the same answers, and maps every fault to the same
TeacherError. The rest of the suite runs every hosted-teacher test on both paths (conftest.py)."""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from helpers import API_KEY, read_jsonl, write_prompts, write_recipe
from pydantic import ValidationError

from apprentice.errors import TeacherError
from factory.__main__ import main
from factory.recipe import CLIENT_ENV, TeacherConfig
from factory.teachers import make_teacher

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
# The headers the limiter reads, by provider (the fake sends them when it enforces limits).
LIMIT_HEADERS = {"openai": "x-ratelimit-", "anthropic": "anthropic-ratelimit-"}


def teachers(server, provider: str, **options):
    base_url = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    return [make_teacher(TeacherConfig(provider=provider, model=MODELS[provider], base_url=base_url,
                                       api_key_env="APPRENTICE_TEST_KEY", client=client, **options))
            for client in ("sdk", "raw")]


async def outcome(teacher, body):
    """The answer, or the error, of one request; the teacher is closed after it."""
    try:
        return await teacher.complete(body)
    except TeacherError as error:
        return error
    finally:
        await teacher.aclose()


def ask_both(server, provider: str, messages: list[dict[str, str]], n: int = 1, **options):
    """The outcome of the same request on the sdk path, then on the raw path."""
    sdk, raw = teachers(server, provider, **options)
    assert sdk.wire is None and raw.wire is not None, "each teacher is on the path it was asked for"
    return [asyncio.run(outcome(teacher, teacher.build_request(messages, n))) for teacher in (sdk, raw)]


HELLO = [{"role": "user", "content": "hello"}]


def readable(logprobs):
    """TokenLogprobs as plain values, to compare; None stays None."""
    if logprobs is None:
        return None
    values = {field.name: getattr(logprobs, field.name) for field in dataclasses.fields(logprobs)}
    return {name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in values.items()}


def test_the_variable_sets_the_path_where_the_recipe_does_not(server, teacher_client, env_key):
    """The switch the rest of the suite runs on: the conftest's parameter reaches the teacher."""
    teacher = make_teacher(TeacherConfig(provider="openai", model="m", base_url=server.openai_base_url,
                                         api_key_env="APPRENTICE_TEST_KEY"))
    assert (teacher.wire is None) == (teacher_client == "sdk"), teacher_client
    assert TeacherConfig(provider="local").client is None, "an in-process teacher has no request path"


@pytest.mark.one_client
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_both_paths_send_the_same_bodies_and_read_the_same_answers(server, env_key, provider):
    server.config.rpm, server.config.tpm = 10_000, 10_000_000  # so that the answers carry limit headers
    messages = [{"role": "system", "content": "Be brief. ünïcode ✓"}, {"role": "user", "content": "Say hi"}]
    if provider == "openai":
        options = {"params": {"temperature": 0.5, "max_tokens": 32, "logit_bias": {50256: -100}, "top_k": 5},
                   "logprobs": {"top_k": 3, "token_ids": True}}
        n = 3
    else:
        options = {"params": {"temperature": 0.5, "max_tokens": 32, "stop": ["\n\n"]},
                   "structured_output": {"name": "answer", "json_schema": {
                       "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
        n = 1
        server.config.responder = lambda messages, index, body: {"text": "hi"}
    sdk, raw = ask_both(server, provider, messages, n, **options)
    first, second = server.stats.bodies
    assert first == second, "the same body on the wire from both paths"
    assert first == teachers(server, provider, **options)[0].build_request(messages, n) | (
        {"logit_bias": {"50256": -100}} if provider == "openai" else {}), "the body the cache keyed on, as JSON"
    assert [(c.text, c.finish_reason) for c in raw.choices] == [(c.text, c.finish_reason) for c in sdk.choices]
    assert [readable(c.logprobs) for c in raw.choices] == [readable(c.logprobs) for c in sdk.choices], \
        "the same logprobs, token ids included"
    if provider == "openai":
        assert raw.choices[0].logprobs.sampled_ids is not None, "the ids were asked for and read"
    assert (sdk.input_tokens, sdk.output_tokens) == (raw.input_tokens, raw.output_tokens)
    limits = {key: value for key, value in sdk.headers.items() if key.startswith(LIMIT_HEADERS[provider])}
    assert limits, "the fake sent rate-limit headers"
    assert {key for key in raw.headers if key.startswith(LIMIT_HEADERS[provider])} == set(limits), \
        "the limiter reads the same headers"
    assert {key: raw.headers[key] for key in limits if not ("remaining" in key or "reset" in key)} == \
        {key: value for key, value in limits.items() if not ("remaining" in key or "reset" in key)}, \
        "with the same limits (what remains and when it resets moved on between the two requests)"


FAULTS = ["429", "500", "503", "529", "400", "401", "403", "404", "malformed", "timeout"]


@pytest.mark.one_client
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_both_paths_map_a_fault_to_the_same_error(server, env_key, provider, fault):
    server.config.faults.update({1: fault, 2: fault})
    server.config.retry_after, server.config.slow_s = 2.5, 1.0
    sdk, raw = ask_both(server, provider, HELLO, timeout_s=0.3)
    assert isinstance(sdk, TeacherError) and isinstance(raw, TeacherError), (sdk, raw)
    assert str(raw) == str(sdk), "the same message"
    fields = ("retryable", "status", "retry_after", "rate_limited", "fatal")
    assert {f: getattr(raw, f) for f in fields} == {f: getattr(sdk, f) for f in fields}
    assert raw.headers == sdk.headers, "the same headers, lower-case"
    if fault == "429":
        assert raw.rate_limited and raw.retry_after == 2.5 and raw.retryable


@pytest.mark.one_client
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_dropped_connection_is_a_retryable_connection_error_on_both_paths(server, env_key, provider):
    server.config.faults.update({1: "drop", 2: "drop"})
    sdk, raw = ask_both(server, provider, HELLO)
    for error in (sdk, raw):
        assert isinstance(error, TeacherError) and error.retryable and error.status is None, error
        # The words after the prefix are the HTTP library's own (httpx for the SDKs, aiohttp here).
        assert str(error).startswith("connection error: "), str(error)


def test_nothing_listening_is_a_connection_error_on_both_paths(env_key):
    for client in ("sdk", "raw"):
        teacher = make_teacher(TeacherConfig(provider="openai", model="m", base_url="http://127.0.0.1:9/v1",
                                             api_key_env="APPRENTICE_TEST_KEY", client=client))
        error = asyncio.run(outcome(teacher, teacher.build_request(HELLO, 1)))
        assert isinstance(error, TeacherError) and error.retryable, (client, error)
        assert str(error).startswith("connection error: "), (client, str(error))


@pytest.mark.one_client
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_base_url_as_the_sdk_resolves_it_with_or_without_a_slash_or_from_its_variable(server, env_key, monkeypatch,
                                                                                      provider):
    base = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    variable = "OPENAI_BASE_URL" if provider == "openai" else "ANTHROPIC_BASE_URL"
    monkeypatch.setenv(variable, base)
    path = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    for base_url in (base, base + "/", None):
        teacher = make_teacher(TeacherConfig(provider=provider, model=MODELS[provider], base_url=base_url,
                                             api_key_env="APPRENTICE_TEST_KEY", client="raw"))
        assert teacher.wire.url == server.url + path, base_url
        answer = asyncio.run(outcome(teacher, teacher.build_request(HELLO, 1)))
        assert not isinstance(answer, TeacherError), (base_url, answer)


@pytest.mark.one_client
def test_the_key_travels_in_the_headers_the_sdk_sends_and_a_wrong_one_is_fatal(server, monkeypatch):
    monkeypatch.setenv("APPRENTICE_TEST_KEY", "sk-wrong")
    sdk, raw = ask_both(server, "openai", HELLO)
    assert raw.fatal and raw.status == 401 and str(raw) == str(sdk)
    monkeypatch.setenv("APPRENTICE_TEST_KEY", API_KEY)
    sdk, raw = ask_both(server, "openai", HELLO)
    assert not isinstance(raw, TeacherError), raw


@pytest.mark.one_client
def test_a_run_made_on_one_path_resumes_on_the_other_and_sends_nothing_again(tmp_path, server, env_key):
    """`client` changes how requests are sent, not what: the same fingerprint, the same cache keys."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 5),
                          provider="openai", base_url=server.openai_base_url, n=2, extra_teacher="    client: sdk\n")
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 5
    (run / "accepted.jsonl").unlink()  # the records go; the cache keeps what was paid for
    server.reset_stats()
    assert main(["generate", str(recipe), "--set", "factory.teacher.client=raw"]) == 0
    assert server.stats.total == 0, "every answer came from the cache the sdk path filled"
    assert len(read_jsonl(run / "accepted.jsonl")) == 10


def test_client_is_for_the_hosted_providers_and_the_variable_must_name_a_path(monkeypatch):
    with pytest.raises(ValidationError, match="client is for providers openai and anthropic"):
        TeacherConfig(provider="local", client="raw")
    monkeypatch.setenv(CLIENT_ENV, "fast")
    with pytest.raises(ValidationError, match=f"{CLIENT_ENV}='fast': set it to raw or sdk"):
        TeacherConfig(provider="openai", model="m")
    monkeypatch.setenv(CLIENT_ENV, "sdk")
    assert TeacherConfig(provider="anthropic", model="m").client == "sdk"
    assert TeacherConfig(provider="anthropic", model="m", client="raw").client == "raw", "the recipe rules"
