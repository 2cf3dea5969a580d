"""A loopback fake of the OpenAI chat-completions and Anthropic Messages APIs, for tests and benchmarks.

Pure asyncio (an `asyncio.Protocol`, HTTP/1.1 with keep-alive), stdlib only, bound to 127.0.0.1 only.
It answers with deterministic text, enforces optional rate limits with the providers' headers, and
injects faults on chosen requests, while counting what it answered so that a test can check that
no successful (paid) request body was answered twice.

Test and benchmark tooling, not part of the product: nothing in factory/, sft/, eval/ or quality_checks/
imports it.

    from fakes import FakeServer

    with FakeServer(latency_s=0.01, rpm=600, api_key="sk-test") as server:
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test")
        ...                                   # anthropic.AsyncAnthropic(base_url=server.anthropic_base_url)
        server.config.faults[5] = "drop"      # the 5th request (all endpoints together) gets no answer
        assert max(server.stats.answered.values()) == 1

    python -m fakes --port 0 --latency 0.2 [--rpm N --tpm N --api-key K --fault 3=429
                    --fault-rate 500=0.1]       # prints "PORT <n>", serves until SIGTERM

Modules: fakes/common.py (config, stats, replies, error vocabulary: what both halves share),
fakes/server.py (the chat endpoints, rate limits, faults, HTTP), fakes/structured.py (response_format,
tools: request checks and schema-bound answers), fakes/streaming.py (streamed answers), fakes/batch.py (the Batch APIs),
fakes/app.py (`FakeServer`: the two composed), fakes/__main__.py (the command line).

Streaming: an OpenAI request with `stream: true` is answered as server-sent events, one HTTP chunk each
(fakes/streaming.py), `stream_chunk_s` apart; `stream_hold_after: k` holds a stream after k content chunks
until `server.release_streams()`, and the "stream_error" / "stream_drop" faults cut one after
`stream_cut_after` content chunks (stats: `streams`, `stream_chunks_sent`, `stream_chunks_held`).

Endpoints: POST to any path ending in `/chat/completions` (OpenAI) or `/messages` (Anthropic); the
batch APIs (fakes/batch.py) below; any other path is a 404 with an OpenAI-shaped JSON error.

Batch APIs, for the real SDKs' `client.files` / `client.batches` and `client.messages.batches`:
OpenAI `POST /v1/files` (multipart, purpose "batch"; every line is checked, a bad one is a 400 naming
it), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`, `POST /v1/batches`
(endpoint /v1/chat/completions only), `GET /v1/batches[?limit&after]`, `GET /v1/batches/{id}`,
`POST /v1/batches/{id}/cancel`; Anthropic `POST|GET /v1/messages/batches`, `GET .../{id}`,
`POST .../{id}/cancel`, `GET .../{id}/results` (JSONL). A batch is in progress for `batch_delay_s`
(counts rising linearly), then ends with every item answered as the online endpoint would, or as
`batch_fault(custom_id, attempt)` says: "error" (500), "invalid" (400) or "expired"; attempt is 1 + the
number of earlier batches on this server that held that custom_id. Results come shuffled. Batch
requests skip the faults table, rate limits and latency, but need the API key and count towards
`max_requests` and `stats.total`; `batch_create_lost: ["drop", "500"]` creates the next batches and then
loses their answers.

Prompt caching: with `prompt_cache_min_tokens` set, a prompt whose prefix was seen before reports it as
cached (OpenAI `prompt_tokens_details.cached_tokens`; Anthropic `cache_read_input_tokens` and
`cache_creation_input_tokens`); see fakes/server.py.

Token counts, rate limits, the order of decisions for one request and the fault kinds are described
in fakes/server.py. The config is read on every request, so tests may change it while the server runs
(`server.config.faults[5] = "drop"`, `server.config.responder = fn`, `server.config.rpm = 10`).
"""
from fakes.app import FakeServer
from fakes.batch import FakeBatches
from fakes.common import FakeConfig, FakeStats, Reply, Responder
from fakes.server import ChatServer, content_text, count_tokens, default_responder, fake_logprobs, openai_duration

__all__ = [
    "ChatServer", "FakeBatches", "FakeConfig", "FakeServer", "FakeStats", "Reply", "Responder",
    "content_text", "count_tokens", "default_responder", "fake_logprobs", "openai_duration",
]
