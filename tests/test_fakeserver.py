"""The loopback fake OpenAI + Anthropic server, driven through the real SDKs (max_retries=0)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import time

import anthropic
import openai
import pytest
from helpers import API_KEY, PYTHON, REPO

from factory.limiter import parse_duration
from fakes import FakeConfig, FakeServer, count_tokens, openai_duration

# The SDKs against the fake, no teacher: one run, not one per teacher.client.
pytestmark = [pytest.mark.timeout(60), pytest.mark.one_client]

USER = [{"role": "user", "content": "hello there, teacher"}]


def run(coro):
    return asyncio.run(coro)


def oai(server: FakeServer, key: str = API_KEY, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0, **kw)


def ant(server: FakeServer, key: str = API_KEY, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key=key, max_retries=0, **kw)


@pytest.fixture
def fake():
    """A server without an API key, for tests that set their own options."""
    servers = []

    def make(**options) -> FakeServer:
        server = FakeServer(FakeConfig(**options)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def test_openai_n_choices_usage_and_stats(server):
    async def go():
        async with oai(server) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "system", "content": "Be brief."}, *USER], n=3, max_tokens=50)
            return raw.http_response.status_code, json.loads(raw.content), raw.parse()

    status, data, parsed = run(go())
    assert status == 200 and data["object"] == "chat.completion" and data["model"] == "gpt-4o-mini"
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in data["choices"]] == [f"Answer {i}: hello there, teacher" for i in range(3)]
    assert {c["finish_reason"] for c in data["choices"]} == {"stop"} and data["choices"][0]["logprobs"] is None
    usage = data["usage"]
    assert usage["prompt_tokens"] == count_tokens("Be brief." + USER[0]["content"])
    assert usage["completion_tokens"] == 3 * count_tokens("Answer 0: hello there, teacher")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert parsed.choices[2].message.content.startswith("Answer 2:")

    snap = server.stats.snapshot()
    assert snap["total"] == 1 and snap["by_status"] == {200: 1} and snap["bodies"][0]["n"] == 3
    [(digest, count)] = snap["answered"].items()
    assert count == 1 and digest == hashlib.sha256(json.dumps(snap["bodies"][0], sort_keys=True).encode()).hexdigest()
    server.reset_stats()
    assert server.stats.total == 0 and not server.stats.answered and not server.stats.bodies


def test_anthropic_message_shape_system_and_list_content(server):
    async def go():
        async with ant(server) as client:
            raw = await client.messages.with_raw_response.create(
                model="claude-haiku-4-5", max_tokens=100, system="Be brief.",
                messages=[{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]}])
            return json.loads(await raw.read()), await raw.parse()

    data, parsed = run(go())
    assert data["type"] == "message" and data["role"] == "assistant" and data["id"].startswith("msg_")
    assert data["content"] == [{"type": "text", "text": "Answer 0: hi you"}]
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    assert data["usage"] == {"input_tokens": count_tokens("Be brief.hi you"), "output_tokens": count_tokens("Answer 0: hi you")}
    assert parsed.content[0].text == "Answer 0: hi you"
    assert server.stats.bodies[0]["system"] == "Be brief."


def test_length_truncation_both_providers(server):
    server.config.responder = lambda messages, index, body: "word " * 100  # 500 chars, 125 tokens

    async def go():
        async with oai(server) as o, ant(server) as a:
            first = await o.chat.completions.create(model="m", messages=USER, max_completion_tokens=10)
            second = await a.messages.create(model="m", max_tokens=10, messages=USER)
            third = await o.chat.completions.create(model="m", messages=USER, max_tokens=1000)
            return first, second, third

    first, second, third = run(go())
    assert first.choices[0].finish_reason == "length" and len(first.choices[0].message.content) == 40
    assert first.usage.completion_tokens == 10
    assert second.stop_reason == "max_tokens" and len(second.content[0].text) == 40 and second.usage.output_tokens == 10
    assert third.choices[0].finish_reason == "stop" and third.usage.completion_tokens == 125


def test_injected_faults_by_sequence_number_across_endpoints(server):
    server.config.faults.update({1: "429", 2: "429", 3: "500", 4: "503", 5: "drop", 6: "malformed", 7: "529"})
    server.config.retry_after = 2.5

    async def go():
        errors = []
        async with oai(server) as o, ant(server) as a:
            calls = [
                lambda: o.chat.completions.create(model="m", messages=USER),
                lambda: a.messages.create(model="m", max_tokens=5, messages=USER),
                lambda: o.chat.completions.create(model="m", messages=USER),
                lambda: a.messages.create(model="m", max_tokens=5, messages=USER),
                lambda: o.chat.completions.create(model="m", messages=USER),
                lambda: o.chat.completions.with_raw_response.create(model="m", messages=USER),
                lambda: a.messages.create(model="m", max_tokens=5, messages=USER),
                lambda: o.chat.completions.create(model="m", messages=USER),
            ]
            for call in calls:
                try:
                    errors.append(await call())
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
        return errors

    e429o, e429a, e500, e503, drop, malformed, e529, ok = run(go())
    assert isinstance(e429o, openai.RateLimitError) and isinstance(e429a, anthropic.RateLimitError)
    for exc in (e429o, e429a):
        assert exc.response.headers["retry-after"] == "3" and exc.response.headers["retry-after-ms"] == "2500"
    assert e429o.body["type"] == "rate_limit_error" and e429o.body["code"] == "rate_limit_exceeded"
    assert e429a.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "fake server: injected 429"}}
    assert isinstance(e500, openai.InternalServerError) and e500.status_code == 500
    assert isinstance(e503, anthropic.InternalServerError) and e503.status_code == 503
    assert e503.body["error"]["type"] == "overloaded_error"
    assert isinstance(drop, openai.APIConnectionError) and not isinstance(drop, openai.APITimeoutError)
    assert malformed.http_response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(malformed.content)
    assert isinstance(e529, anthropic.APIStatusError) and e529.status_code == 529
    assert ok.choices[0].message.content.startswith("Answer 0")

    snap = server.stats.snapshot()
    assert snap["total"] == 8 and snap["rate_limited"] == 2
    assert snap["by_status"] == {429: 2, 500: 1, 503: 1, "drop": 1, 200: 2, 529: 1}
    assert len(snap["answered"]) == 1  # the malformed 200 is not a real answer
    assert snap["faults"] == {"429": 2, "500": 1, "503": 1, "drop": 1, "malformed": 1, "529": 1}


def test_fault_rates_are_seeded_and_reproducible(fake):
    def outcomes(seed):
        server = fake(fault_rates={"500": 0.3, "drop": 0.2}, seed=seed)

        async def go():
            out = []
            async with oai(server, "k") as client:
                for _ in range(30):
                    try:
                        await client.chat.completions.create(model="m", messages=USER)
                        out.append("ok")
                    except openai.InternalServerError:
                        out.append("500")
                    except openai.APIConnectionError:
                        out.append("drop")
            return out

        return run(go())

    first, second = outcomes(7), outcomes(7)
    assert first == second
    assert {"ok", "500", "drop"} <= set(first)


def test_slow_fault_times_out_the_client_and_is_not_counted_as_answered(fake):
    server = fake(faults={1: "slow"}, slow_s=0.5)

    async def go():
        async with oai(server, "k", timeout=0.15) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model="m", messages=USER)
            start = time.perf_counter()
            await client.chat.completions.create(model="m", messages=USER)
            return time.perf_counter() - start

    assert run(go()) < 0.15
    deadline = time.monotonic() + 2
    while server.stats.client_gone == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    snap = server.stats.snapshot()
    assert snap["client_gone"] == 1 and snap["by_status"] == {200: 1} and len(snap["answered"]) == 1


def test_rpm_limit_headers_count_down_then_429(fake):
    server = fake(rpm=3)

    async def go():
        remaining, resets = [], []
        async with oai(server, "k") as client:
            for _ in range(3):
                raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER, max_tokens=5)
                assert raw.headers["x-ratelimit-limit-requests"] == "3"
                remaining.append(raw.headers["x-ratelimit-remaining-requests"])
                resets.append(raw.headers["x-ratelimit-reset-requests"])
                assert "x-ratelimit-limit-tokens" not in raw.headers  # no tpm set
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
        async with ant(server, "k") as client:
            with pytest.raises(anthropic.RateLimitError) as caught_a:
                await client.messages.create(model="m", max_tokens=5, messages=USER)
        return remaining, resets, caught.value, caught_a.value

    remaining, resets, exc, exc_a = run(go())
    assert remaining == ["2", "1", "0"]
    # a bucket refilled over 60 s: time until full again is 20 s per request used
    assert [round(parse_duration(r)) for r in resets] == [20, 40, 60]
    headers = exc.response.headers
    assert int(headers["retry-after"]) >= 19 and headers["x-ratelimit-remaining-requests"] == "0"
    assert exc.body["type"] == "rate_limit_error"
    headers_a = exc_a.response.headers
    assert headers_a["anthropic-ratelimit-requests-limit"] == "3"
    assert headers_a["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers_a["anthropic-ratelimit-requests-reset"].endswith("Z") and int(headers_a["retry-after"]) >= 1
    assert exc_a.body["error"]["type"] == "rate_limit_error"
    snap = server.stats.snapshot()
    assert snap["rate_limited"] == 2 and snap["by_status"] == {200: 3, 429: 2}


def test_tpm_counts_input_plus_max_tokens_and_anthropic_families(fake):
    server = fake(tpm=100, input_tpm=1000, output_tpm=50, rate_window_s=60)

    async def go():
        async with oai(server, "k") as o, ant(server, "k") as a:
            raw = await o.chat.completions.with_raw_response.create(model="m", messages=USER, max_tokens=20, n=2)
            tokens_left = int(raw.headers["x-ratelimit-remaining-tokens"])
            raw_a = await a.messages.with_raw_response.create(model="m", max_tokens=30, messages=USER)
            with pytest.raises(anthropic.RateLimitError) as caught:  # output tokens: 30 used of 50
                await a.messages.create(model="m", max_tokens=30, messages=USER)
            return tokens_left, raw_a.headers, caught.value

    tokens_left, headers, exc = run(go())
    cost = count_tokens(USER[0]["content"]) + 2 * 20
    assert tokens_left == 100 - cost
    assert headers["anthropic-ratelimit-tokens-remaining"] == str(100 - cost - count_tokens(USER[0]["content"]) - 30)
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "1000"
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "20"
    assert exc.body["error"]["message"].startswith("Rate limit reached for output_tokens")


def test_sliding_window_mode_and_runtime_limit_change(fake):
    server = fake(rpm=2, rate_mode="sliding", rate_window_s=0.3)

    async def go():
        async with oai(server, "k") as client:
            create = lambda: client.chat.completions.create(model="m", messages=USER)  # noqa: E731
            await create()
            await create()
            with pytest.raises(openai.RateLimitError):
                await create()
            await asyncio.sleep(0.35)
            await create()  # the window slid past the first two
            server.config.rpm = None  # limits are read on every request
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
            return raw.headers

    headers = run(go())
    assert "x-ratelimit-limit-requests" not in headers
    assert server.stats.by_status == {200: 4, 429: 1}


def test_wrong_or_missing_key_is_401_provider_shaped(server):
    async def go():
        async with oai(server, "sk-wrong") as o, ant(server, "sk-wrong") as a:
            with pytest.raises(openai.AuthenticationError) as e1:
                await o.chat.completions.create(model="m", messages=USER)
            with pytest.raises(anthropic.AuthenticationError) as e2:
                await a.messages.create(model="m", max_tokens=5, messages=USER)
        return e1.value, e2.value

    e1, e2 = run(go())
    assert e1.status_code == 401 and e1.body["code"] == "invalid_api_key"
    assert e2.body["type"] == "error" and e2.body["error"]["type"] == "authentication_error"
    assert server.stats.by_status == {401: 2} and not server.stats.answered


def test_responder_errors_and_max_requests_bound(fake):
    server = fake(max_requests=3)

    def responder(messages, index, body):
        raise ValueError("boom")

    async def go():
        async with oai(server, "k") as client:
            await client.chat.completions.create(model="m", messages=USER)
            server.config.responder = responder
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model="m", messages=USER)
            server.config.responder = None
            await client.chat.completions.create(model="m", messages=USER)
            with pytest.raises(openai.InternalServerError) as over:
                await client.chat.completions.create(model="m", messages=USER)
        return caught.value, over.value

    boom, over = run(go())
    assert "ValueError: boom" in boom.message
    assert over.status_code == 503 and "max_requests" in over.message
    assert server.stats.over_max_requests == 1


VERDICT = {"type": "object",
           "properties": {"rationale": {"type": "string"}, "score": {"type": "integer", "enum": [1, 2, 3]}},
           "required": ["rationale", "score"], "additionalProperties": False}


def test_openai_response_format_json_schema_is_checked_and_answered_as_json(server):
    answers = iter([{"rationale": "fine", "score": 3}, {"rationale": "fine", "score": 9}, "not json"])
    server.config.responder = lambda messages, index, body: next(answers)
    strict = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT}}
    not_strict_enough = {"type": "json_schema",
                         "json_schema": {"name": "v", "strict": True, "schema": {**VERDICT, "required": ["score"]}}}

    async def go():
        async with oai(server) as client:
            good = await client.chat.completions.create(model="m", messages=USER, response_format=strict)
            errors = []
            for response_format in (strict, strict,  # the responder breaks the schema: 500s
                                    not_strict_enough,
                                    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": VERDICT}},
                                    {"type": "xml"}):
                with pytest.raises(openai.APIStatusError) as caught:
                    await client.chat.completions.create(model="m", messages=USER, response_format=response_format)
                errors.append((caught.value.status_code, caught.value.message))
            return good, errors

    good, errors = run(go())
    assert json.loads(good.choices[0].message.content) == {"rationale": "fine", "score": 3}
    assert [status for status, _ in errors] == [500, 500, 400, 400, 400]
    assert "$.score is not one of [1, 2, 3]" in errors[0][1] and "not JSON" in errors[1][1]
    assert "'required' must list every property" in errors[2][1], errors[2][1]
    assert "name must match" in errors[3][1] and "response_format.type" in errors[4][1]


def test_anthropic_forced_tool_is_answered_with_a_tool_use_block(server):
    server.config.responder = lambda messages, index, body: {"rationale": "ok", "score": 2}
    tool = {"name": "verdict", "description": "Record it.", "input_schema": VERDICT}

    async def go():
        async with ant(server) as client:
            forced = await client.messages.create(model="m", max_tokens=100, messages=USER, tools=[tool],
                                                  tool_choice={"type": "tool", "name": "verdict"})
            cut = await client.messages.create(model="m", max_tokens=2, messages=USER, tools=[tool],
                                               tool_choice={"type": "tool", "name": "verdict"})
            with pytest.raises(anthropic.BadRequestError) as unknown:
                await client.messages.create(model="m", max_tokens=100, messages=USER, tools=[tool],
                                             tool_choice={"type": "tool", "name": "other"})
            return forced, cut, unknown.value

    forced, cut, unknown = run(go())
    assert forced.stop_reason == "tool_use" and [block.type for block in forced.content] == ["tool_use"]
    assert forced.content[0].name == "verdict" and forced.content[0].input == {"rationale": "ok", "score": 2}
    assert cut.stop_reason == "max_tokens" and cut.content[0].input == {}
    assert "no tool named 'other'" in unknown.message


def _raw_exchange(port: int, payload: bytes, responses: int) -> list[tuple[bytes, dict, bytes]]:
    """Send raw bytes on one connection; read `responses` Content-Length responses back."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        buffer = b""
        while len(out) < responses:
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, "server closed early"
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            headers = dict(line.decode().lower().split(": ", 1) for line in lines[1:])
            length = int(headers["content-length"])
            while len(buffer) < length:
                buffer += sock.recv(65536)
            out.append((lines[0], headers, buffer[:length]))
            buffer = buffer[length:]
    return out


def test_keep_alive_pipelining_chunked_body_and_404(fake):
    server = fake(latency_s=0.01)
    body = json.dumps({"model": "m", "messages": USER}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    payload = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        + b"POST /v1/unknown HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        + b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    replies = _raw_exchange(server.port, payload, 4)
    statuses = [line.split()[1] for line, _, _ in replies]
    assert statuses == [b"200", b"200", b"404", b"200"]
    assert json.loads(replies[0][2])["choices"][0]["message"]["content"] == json.loads(replies[1][2])["choices"][0]["message"]["content"]
    assert json.loads(replies[2][2])["error"]["code"] == "not_found"
    assert json.loads(replies[3][2])["type"] == "message"
    # the same body answered three times (both endpoints, by design here): the stats show it
    assert list(server.stats.duplicates().values()) == [3]


def test_async_serve_in_a_running_loop():
    async def go():
        server = FakeServer(latency_s=0.05)
        task = asyncio.create_task(server.serve())
        while server.port is None:
            await asyncio.sleep(0.001)
        async with oai(server, "k") as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
                for i in range(20)))
            elapsed = time.perf_counter() - start
        server.stop()
        await asyncio.wait_for(task, 5)
        return results, elapsed

    results, elapsed = run(go())
    assert [r.choices[0].message.content for r in results] == [f"Answer 0: q{i}" for i in range(20)]
    assert 0.05 <= elapsed < 1.0  # latency applies concurrently, not one after another


def test_openai_duration_format():
    assert openai_duration(0.12) == "120ms"
    assert openai_duration(1) == "1s"
    assert openai_duration(1.5) == "1.5s"
    assert openai_duration(360) == "6m0s"
    assert openai_duration(3723) == "1h2m3s"


def test_cli_subprocess_serves_until_sigterm():
    proc = subprocess.Popen(
        [PYTHON, "-m", "fakes", "--port", "0", "--latency", "0.01", "--api-key", "cli-key",
         "--rpm", "100", "--fault", "2=503", "--fault-rate", "500=0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "PORT" and int(line[1]) > 0
        port = int(line[1])

        async def go():
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
            async with client:
                raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
                with pytest.raises(openai.InternalServerError):
                    await client.chat.completions.create(model="m", messages=USER)
                return raw.headers, raw.parse()

        headers, answer = run(go())
        assert answer.choices[0].message.content == "Answer 0: hello there, teacher"
        assert headers["x-ratelimit-remaining-requests"] == "99"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "2 requests" in err


def test_prompt_cache_reports_a_repeated_prefix_as_cached_on_both_providers(fake):
    server = fake(prompt_cache_min_tokens=50)
    context = "Rules of the house. " * 20  # 400 characters: 100 tokens
    system = {"role": "system", "content": context}

    async def go():
        async with oai(server) as o, ant(server) as a:
            openai_usage = [(await o.chat.completions.create(
                model="m", messages=[system, {"role": "user", "content": f"question {i}"}])).usage for i in range(2)]
            anthropic_usage = [(await a.messages.create(
                model="m", max_tokens=10, system=context,
                messages=[{"role": "user", "content": f"question {i}"}])).usage for i in range(2)]
            short = (await o.chat.completions.create(model="m", messages=USER)).usage
            return openai_usage, anthropic_usage, short

    openai_usage, anthropic_usage, short = run(go())
    total = count_tokens(context + "question 0")
    assert [u.prompt_tokens for u in openai_usage] == [total, total], "prompt_tokens include the cached ones"
    assert [u.prompt_tokens_details.cached_tokens for u in openai_usage] == [0, count_tokens(context)]
    first, second = anthropic_usage
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (count_tokens(context), 0)
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, count_tokens(context))
    assert second.input_tokens == total - count_tokens(context), "Anthropic's input_tokens leave the cache out"
    assert short.prompt_tokens_details.cached_tokens == 0, "a prefix under prompt_cache_min_tokens is not cached"


def test_without_prompt_cache_usage_has_no_cache_fields(server):
    async def go():
        async with oai(server) as client:
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER * 2)
            return json.loads(raw.content)["usage"]

    assert "prompt_tokens_details" not in run(go())


def test_openai_streams_chunk_by_chunk_holds_on_request_and_cuts_with_an_error_or_a_drop(fake):
    server = fake(responder=lambda messages, i, body: "one two three four", stream_hold_after=1, stream_cut_after=2)
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0, timeout=10)

    def stream(**options):
        return client.chat.completions.create(model="m", messages=USER, stream=True, **options)

    chunks = []
    for chunk in stream(logprobs=True, top_logprobs=1, stream_options={"include_usage": True}):
        chunks.append(chunk)
        if len(chunks) == 2:  # the role chunk and the first content chunk; the fake holds the rest
            assert server.stats.stream_chunks_held == 8, "4 content chunks, the finish, usage, [DONE], the end"
            server.release_streams()
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["one ", "two ", "thre", "e fo", "ur"], "one 4-character token a chunk"
    assert [c.choices[0].logprobs.content[0].token for c in chunks[1:6]] == pieces, "each with its logprobs"
    assert chunks[-1].usage.completion_tokens == 4 and server.stats.stream_chunks_held == 0
    server.config.stream_hold_after = None
    server.config.faults.update({2: "stream_error", 3: "stream_drop", 4: "stream_error"})
    for kind, error in (("stream_error", openai.APIError), ("stream_drop", openai.APIConnectionError)):
        got = []
        with pytest.raises(error):
            for chunk in stream():
                got.append(chunk.choices[0].delta.content)
        assert got == ["", "one ", "two "], f"{kind}: cut after stream_cut_after content chunks"
    answer = client.chat.completions.create(model="m", messages=USER)  # a fault of a stream's kind, not streamed
    assert answer.choices[0].message.content == "one two three four"
    assert server.stats.streams == 3 and len(server.stats.answered) == 2, "a cut stream is not an answer"
