"""The fake server's batch APIs (fakes/batch.py), driven through the real openai and anthropic SDKs."""
from __future__ import annotations

import asyncio
import json
import time

import anthropic
import openai
import pytest
from anthropic.types.messages import (
    MessageBatchCanceledResult,
    MessageBatchErroredResult,
    MessageBatchExpiredResult,
    MessageBatchSucceededResult,
)
from helpers import API_KEY
from openai.types.chat import ChatCompletion

# The SDKs against the fake, no teacher: one run, not one per teacher.client.
pytestmark = [pytest.mark.timeout(60), pytest.mark.one_client]

OPENAI_DONE = {"completed", "expired", "cancelled", "failed"}
FAULTS = {"boom": "error", "bad": "invalid"}


def oai(server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def ant(server, key: str = API_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.anthropic_base_url, api_key=key, max_retries=0)


def fault_once_expired(custom_id: str, attempt: int) -> str | None:
    """"boom" fails, "bad" is invalid, "late" expires on its first attempt only."""
    return "expired" if custom_id == "late" and attempt == 1 else FAULTS.get(custom_id)


def line(custom_id: str, content: str, **params) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **params}}


def jsonl_bytes(lines: list[dict]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def submit(client: openai.OpenAI, lines: list[dict], **options) -> openai.types.Batch:
    file = client.files.create(file=("requests.jsonl", jsonl_bytes(lines)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", **options)


def poll(retrieve, batch_id: str, done, timeout: float = 10.0) -> list:
    """Every state seen until `done(state)`."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        seen.append(retrieve(batch_id))
        if done(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"batch {batch_id} never ended: {seen[-1]}"
        time.sleep(0.03)


def by_custom_id(client: openai.OpenAI, file_id: str) -> dict[str, dict]:
    records = [json.loads(text) for text in client.files.content(file_id).text.splitlines()]
    mapping = {record["custom_id"]: record for record in records}
    assert len(mapping) == len(records), "a custom_id appears twice"
    return mapping


def age(server, batch_id: str, seconds: float) -> None:
    """Pretend the batch was created `seconds` earlier (deterministic progress without sleeping)."""
    server.batches.batches[batch_id].started -= seconds


# ---- OpenAI


def test_openai_batch_flow_with_errors_and_a_resend(server):
    server.config.batch_delay_s = 0.3
    server.config.batch_fault = fault_once_expired
    client = oai(server)
    lines = [line(f"ok-{i}", f"question {i}") for i in range(3)] + [line(c, c) for c in ("boom", "bad", "late")]

    batch = submit(client, lines, metadata={"run": "r1"})
    assert (batch.status, batch.request_counts.total, batch.output_file_id) == ("validating", 6, None)
    assert batch.id.startswith("batch_") and batch.object == "batch" and batch.errors is None
    seen = poll(client.batches.retrieve, batch.id, lambda b: b.status in OPENAI_DONE)
    final = seen[-1]
    assert seen[0].status == "in_progress"
    progress = [b.request_counts.completed for b in seen[:-1]]
    assert progress == sorted(progress)
    assert final.status == "completed" and final.metadata == {"run": "r1"} and final.completed_at
    assert final.request_counts.model_dump() == {"total": 6, "completed": 3, "failed": 3}

    output = by_custom_id(client, final.output_file_id)
    errors = by_custom_id(client, final.error_file_id)
    assert set(output) == {"ok-0", "ok-1", "ok-2"} and set(errors) == {"boom", "bad", "late"}
    for i in range(3):
        record = output[f"ok-{i}"]
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(record["response"]["body"])
        assert completion.choices[0].message.content == f"Answer 0: question {i}"
    assert errors["boom"]["response"]["status_code"] == 500
    assert errors["boom"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors["late"]["response"] is None and errors["late"]["error"]["code"] == "batch_expired"

    server.config.batch_delay_s = 0.0
    again = poll(client.batches.retrieve, submit(client, [lines[-1]]).id, lambda b: b.status in OPENAI_DONE)[-1]
    assert again.status == "completed" and again.error_file_id is None
    assert by_custom_id(client, again.output_file_id)["late"]["response"]["status_code"] == 200

    stats = server.stats.snapshot()
    assert (stats["batches_created"], stats["files_uploaded"]) == (2, 2)
    assert stats["batch_items"] == {"ok-0": 1, "ok-1": 1, "ok-2": 1, "boom": 1, "bad": 1, "late": 2}
    assert stats["batch_answered"] == {"ok-0": 1, "ok-1": 1, "ok-2": 1, "late": 1}
    assert stats["answered"] == {}  # online answers only


def test_openai_batch_answers_like_the_online_endpoint(server):
    params = {"n": 2, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}

    async def go():
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
        online = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "a long question"}], **params)
        file = await client.files.create(file=("in.jsonl", jsonl_bytes([line("q", "a long question", **params)])),
                                         purpose="batch")
        batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        batch = await client.batches.retrieve(batch.id)
        content = await client.files.content(batch.output_file_id)
        return online, batch, json.loads(content.text)

    online, batch, record = asyncio.run(go())
    answer = ChatCompletion.model_validate(record["response"]["body"])
    assert batch.status == "completed"
    assert [c.model_dump() for c in answer.choices] == [c.model_dump() for c in online.choices]
    assert answer.choices[0].finish_reason == "length" and answer.choices[1].logprobs.content
    assert answer.usage == online.usage
    assert batch.usage.total_tokens == online.usage.total_tokens


def test_openai_results_are_shuffled_and_all_expired_means_expired(server):
    client = oai(server)
    lines = [line(f"r{i}", f"q{i}") for i in range(20)]
    done = client.batches.retrieve(submit(client, lines).id)
    order = [json.loads(text)["custom_id"] for text in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(order) == sorted(item["custom_id"] for item in lines)
    assert order != [item["custom_id"] for item in lines]

    server.config.batch_fault = lambda custom_id, attempt: "expired"
    expired = client.batches.retrieve(submit(client, lines[:4]).id)
    assert expired.status == "expired" and expired.expired_at and expired.output_file_id is None
    assert {r["error"]["code"] for r in by_custom_id(client, expired.error_file_id).values()} == {"batch_expired"}
    assert expired.request_counts.model_dump() == {"total": 4, "completed": 0, "failed": 4}


def test_openai_progress_finalizing_and_cancel(server):
    server.config.batch_delay_s = 100.0
    client = oai(server)
    lines = [line(f"r{i}", f"q{i}") for i in range(10)]

    first = submit(client, lines)
    age(server, first.id, 40)                            # 0.4 of the delay: half of the in_progress phase
    assert client.batches.retrieve(first.id).request_counts.completed == 5
    age(server, first.id, 45)                            # 0.85: finalizing, with the final counts
    finalizing = client.batches.retrieve(first.id)
    assert finalizing.status == "finalizing" and finalizing.output_file_id is None
    assert finalizing.request_counts.completed == 10
    with pytest.raises(openai.BadRequestError, match="finalizing"):
        client.batches.cancel(first.id)
    age(server, first.id, 15)
    assert client.batches.retrieve(first.id).status == "completed"

    second = submit(client, lines)
    age(server, second.id, 48)                           # 0.48 / 0.8 → 6 of 10 processed
    cancelling = client.batches.cancel(second.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    cancelled = client.batches.retrieve(second.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert cancelled.request_counts.model_dump() == {"total": 10, "completed": 6, "failed": 4}
    assert set(by_custom_id(client, cancelled.output_file_id)) == {f"r{i}" for i in range(6)}
    errors = by_custom_id(client, cancelled.error_file_id)
    assert {r["error"]["code"] for r in errors.values()} == {"batch_cancelled"} and len(errors) == 4


def test_openai_list_is_newest_first_and_paginates(server):
    client = oai(server)
    ids = [submit(client, [line("x", "q")], metadata={"n": str(i)}).id for i in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:0:-1] and page.has_more
    everything = list(client.batches.list(limit=2))
    assert [b.id for b in everything] == ids[::-1]
    assert [b.metadata for b in everything] == [{"n": "2"}, {"n": "1"}, {"n": "0"}]


def test_openai_rejects_bad_files_unknown_ids_and_wrong_keys(server):
    client = oai(server)
    duplicate = [line("a", "q"), line("b", "q"), line("a", "q")]
    with pytest.raises(openai.BadRequestError, match="line 3: duplicate custom_id 'a'"):
        client.files.create(file=("dup.jsonl", jsonl_bytes(duplicate)), purpose="batch")
    wrong_url = [dict(line("a", "q"), url="/v1/embeddings")]
    with pytest.raises(openai.BadRequestError, match="line 1: url"):
        client.files.create(file=("url.jsonl", jsonl_bytes(wrong_url)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 2: not a JSON object"):
        client.files.create(file=("bad.jsonl", jsonl_bytes([line("a", "q")]) + b"{oops\n"), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")

    intruder = oai(server, key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        intruder.files.create(file=("ok.jsonl", jsonl_bytes([line("a", "q")])), purpose="batch")
    with pytest.raises(openai.AuthenticationError):
        intruder.batches.list()
    stats = server.stats.snapshot()
    assert (stats["files_uploaded"], stats["batches_created"]) == (0, 0)
    assert stats["by_status"] == {400: 3, 404: 3, 401: 2}


# ---- Anthropic


def params(content: str) -> dict:
    return {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": content}]}


def test_anthropic_batch_flow_and_typed_results(server):
    server.config.batch_delay_s = 0.3
    server.config.batch_fault = fault_once_expired
    client = ant(server)
    requests = [{"custom_id": f"ok-{i}", "params": params(f"question {i}")} for i in range(3)]
    requests += [{"custom_id": c, "params": params(c)} for c in ("boom", "bad", "late")]

    created = client.messages.batches.create(requests=requests)
    assert created.id.startswith("msgbatch_") and created.processing_status == "in_progress"
    assert created.request_counts.processing == 6 and created.results_url is None
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client.messages.batches.results(created.id)
    ended = poll(client.messages.batches.retrieve, created.id, lambda b: b.processing_status == "ended")[-1]
    assert ended.ended_at and ended.results_url.endswith(f"/v1/messages/batches/{created.id}/results")
    assert ended.request_counts.model_dump() == {"processing": 0, "succeeded": 3, "errored": 2, "canceled": 0,
                                                 "expired": 1}

    results = {item.custom_id: item.result for item in client.messages.batches.results(created.id)}
    assert set(results) == {r["custom_id"] for r in requests}
    for i in range(3):
        assert isinstance(results[f"ok-{i}"], MessageBatchSucceededResult)
        assert results[f"ok-{i}"].message.content[0].text == f"Answer 0: question {i}"
    assert isinstance(results["boom"], MessageBatchErroredResult) and results["boom"].error.error.type == "api_error"
    assert results["bad"].error.error.type == "invalid_request_error"
    assert isinstance(results["late"], MessageBatchExpiredResult)

    server.config.batch_delay_s = 0.0
    resent = client.messages.batches.create(requests=[requests[-1]])
    resent = poll(client.messages.batches.retrieve, resent.id, lambda b: b.processing_status == "ended")[-1]
    assert resent.request_counts.succeeded == 1
    stats = server.stats.snapshot()
    assert stats["batches_created"] == 2 and stats["batch_items"]["late"] == 2
    assert stats["batch_answered"] == {"ok-0": 1, "ok-1": 1, "ok-2": 1, "late": 1}


def test_anthropic_rejects_bad_custom_ids_unknown_ids_and_wrong_keys(server):
    client = ant(server)
    for custom_id in ("bad id!", "x" * 65, ""):
        with pytest.raises(anthropic.BadRequestError, match=r"requests\.1\.custom_id"):
            client.messages.batches.create(requests=[{"custom_id": "fine", "params": params("q")},
                                                     {"custom_id": custom_id, "params": params("q")}])
    with pytest.raises(anthropic.BadRequestError, match="duplicate"):
        client.messages.batches.create(requests=[{"custom_id": "a", "params": params("q")}] * 2)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_nope")
    with pytest.raises(anthropic.AuthenticationError):
        ant(server, key="sk-wrong").messages.batches.list()
    assert server.stats.snapshot()["batches_created"] == 0


def test_anthropic_progress_cancel_list_and_async_results(server):
    server.config.batch_delay_s = 100.0
    client = ant(server)
    batch = client.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params(f"q{i}")}
                                                     for i in range(4)])
    other = client.messages.batches.create(requests=[{"custom_id": "solo", "params": params("q")}])
    age(server, batch.id, 50)
    assert client.messages.batches.retrieve(batch.id).request_counts.processing == 2
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at

    async def results():
        aclient = anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key=API_KEY, max_retries=0)
        return {item.custom_id: item.result async for item in await aclient.messages.batches.results(batch.id)}

    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert (ended.request_counts.succeeded, ended.request_counts.canceled) == (2, 2)
    got = asyncio.run(results())
    kinds = [type(got[f"r{i}"]) for i in range(4)]
    assert kinds == [MessageBatchSucceededResult] * 2 + [MessageBatchCanceledResult] * 2
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.cancel(batch.id)

    assert [b.id for b in client.messages.batches.list(limit=1)] == [other.id, batch.id]
    page = client.messages.batches.list(limit=1)
    assert page.has_more and page.first_id == page.last_id == other.id


# ---- both


def status_of(method: str, url: str, headers: dict) -> int:
    """The HTTP status of one plain request (stdlib: the SDKs' HTTP clients are theirs, not ours to import)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers)) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_batch_routes_leave_online_endpoints_alone(server):
    openai_client, anthropic_client = oai(server), ant(server)
    submit(openai_client, [line("a", "q")])
    anthropic_client.messages.batches.create(requests=[{"custom_id": "a", "params": params("q")}])
    chat = openai_client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    message = anthropic_client.messages.create(**params("hi"))
    assert chat.choices[0].message.content == message.content[0].text == "Answer 0: hi"
    headers = {"authorization": f"Bearer {API_KEY}"}
    assert status_of("GET", server.url + "/v1/batches/x/y/z", headers) == 404
    assert status_of("DELETE", server.url + "/v1/batches", headers) == 405

    server.reset_stats()
    assert server.stats.snapshot()["batch_items"] == {}
    assert server.batches.attempts["a"] == 2  # attempts are counted over the server's lifetime
    server.config.max_requests = server._lifetime
    with pytest.raises(openai.InternalServerError):
        openai_client.batches.list()


def test_a_lost_create_answer_leaves_the_batch_at_the_provider(server):
    server.config.batch_create_lost = ["drop", "500"]
    with pytest.raises(openai.APIConnectionError):
        submit(oai(server), [line("a", "question a")], metadata={"apprentice": "tag"})
    with pytest.raises(anthropic.InternalServerError):
        ant(server).messages.batches.create(requests=[{"custom_id": "b", "params": params("question b")}])
    assert [batch.metadata for batch in oai(server).batches.list()] == [{"apprentice": "tag"}]
    assert len(ant(server).messages.batches.list().data) == 1
    stats = server.stats.snapshot()
    assert stats["batches_created"] == 2 and server.config.batch_create_lost == []
    assert stats["faults"] == {"batch_create_drop": 1, "batch_create_500": 1}
