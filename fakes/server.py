"""The chat half of the fake: OpenAI chat-completions and Anthropic Messages on a loopback asyncio server.

Pure asyncio (an `asyncio.Protocol`, HTTP/1.1 with keep-alive), stdlib only, bound to 127.0.0.1 only.
`ChatServer` answers with deterministic text, enforces optional rate limits with the providers' headers,
and injects faults on chosen requests, while counting what it answered. It knows nothing of the batch
APIs: whoever assembles the fake (fakes/app.py) sets `server.batches` to an object with
`route(path) -> (provider, kind, rest) | None` and `handle(route, method, path, headers, raw) -> Reply`,
and every request whose path it routes is handed to it. Use `fakes.FakeServer` (both halves); the
package docstring (fakes/__init__.py) lists the endpoints and how to run it.

Logprobs: an OpenAI request with `logprobs: true` (and `top_logprobs: k`, 0..20) gets
`choices[i].logprobs.content` like OpenAI's: the answer cut into 4-character tokens, each with a
deterministic logprob and k alternatives (the token itself first, then "<token>~j" less likely), as
strings; with vLLM's `return_tokens_as_token_ids: true` every token is written "token_id:<n>" instead
(n = crc32 of the string mod 50,000).

Structured output (OpenAI `response_format`, Anthropic `tools` / `tool_choice`): checked, and answered
with JSON that matches the schema or with a forced tool call, as fakes/structured.py describes; a
responder may return a dict, sent as JSON.

Token counts are approximate: a text of `c` characters is `max(1, c // 4)` tokens. Input tokens are
counted over the text of every message (plus `system` for Anthropic); an answer longer than
`max_tokens` (`max_completion_tokens` for OpenAI) is cut to `max_tokens * 4` characters and ends with
finish_reason "length" / stop_reason "max_tokens".

Rate limits (`rpm`, `tpm`, and for Anthropic also `input_tpm`, `output_tpm`) are per server, shared by
both endpoints, over `rate_window_s` (60 s). `rate_mode="bucket"` (default) refills continuously like
the providers' token buckets (reset = time until full again); `rate_mode="sliding"` admits a request
only if the last window's admitted cost plus its own stays within the limit (never more than the
limit in any window). `rate_quantum_s` also enforces each limit in fixed windows of that many seconds
(`limit * quantum / rate_window_s` per window), as providers quantise a per-minute limit into seconds;
the headers still describe the per-minute limit, and a 429 from a spent quantum says so only by its
`retry-after` (the time to the next window). A request's token cost is its input tokens plus `n * max_tokens` (0 when it
sends no max_tokens); input-tokens cost the input, output-tokens cost `max_tokens`. Nothing is
refunded. Only requests that reach the model are charged (not 401/404/400 or injected faults).

Order of decisions for one request: the lifetime `max_requests` bound (503), the path (404), the JSON
body (400), the API key (401), an injected fault, the rate limits (429), then the answer. Every
response, errors included, is sent `latency_s` after the request arrived ("slow" adds `slow_s`).

Faults: `config.faults` maps the 1-based sequence number of a request (all endpoints together; it
restarts at `reset_stats()`) to a kind; `config.fault_rates` maps kinds to probabilities, drawn from a
`random.Random(seed)` once per request (explicit `faults` win). Kinds: "drop" (close the connection,
no response), "malformed" (200 with a body that is not JSON), "slow" / "timeout" (answer normally,
`slow_s` later), or an HTTP status as digits ("429" with `retry-after`, "500", "503", "529", ...) with
a provider-shaped error body. "stream_error" and "stream_drop" cut a streamed answer (`stream: true`) after
`stream_cut_after` content chunks with OpenAI's error event, or by closing the connection (fakes/streaming.py);
a request that does not stream is answered as if there were no fault.

Streaming (OpenAI, `stream: true`): the answer as server-sent events, one HTTP chunk each, `stream_chunk_s`
apart (a whole answer waits as long as its stream would have paused in all); with `stream_hold_after: k` a
stream sends its first k content chunks and holds the rest until
`server.release_streams()` (stats: `streams`, `stream_chunks_sent`, `stream_chunks_held`), so that a test can
see what a client received while the backend still had chunks unsent, without timing anything.

Prompt caching (`prompt_cache_min_tokens`, off when None): the server remembers prompt prefixes, cut at
message boundaries (Anthropic's `system` is the first block), and reports the longest one it has seen
before, of at least that many tokens, as cached. OpenAI (automatic, like the real API): every prefix of an
answered prompt is remembered, and `usage.prompt_tokens_details.cached_tokens` counts the cached part of
`prompt_tokens`. Anthropic: everything before the last message is written to the cache as if a
`cache_control` breakpoint ended it (the real API caches only at breakpoints, which the fake does not
require): `cache_creation_input_tokens` when that prefix is new, `cache_read_input_tokens` for the longest
prefix written before, and `input_tokens` the rest. The online and batch endpoints share the cache.

The config is read on every request, so tests may change it while the server runs
(`server.config.faults[5] = "drop"`, `server.config.responder = fn`, `server.config.rpm = 10`).
"""
from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import math
import random
import sys
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any, NamedTuple

import fakes.structured as structured
from fakes.common import HOST, FakeConfig, FakeStats, Reply, error_body, http_reply
from fakes.streaming import stream_plan

MAX_HEADER_BYTES = 64 * 1024
PROMPT_CACHE_ENTRIES = 100_000  # prefixes remembered, oldest forgotten first
MAX_BODY_BYTES = 32 * 1024 * 1024

MALFORMED_BODY = b'{"id": "broken", "choices": [{"index": 0, "message": {"role": "assis'


def count_tokens(text: str) -> int:
    """The fake's token count: one token per 4 characters, at least 1."""
    return max(1, len(text) // 4)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text") or "" if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def fake_logprobs(text: str, top_logprobs: int, as_ids: bool = False) -> dict[str, Any]:
    """The `logprobs` object of one chat-completions choice for `text` (see the module docstring)."""

    def token(piece: str) -> str:
        return f"token_id:{zlib.crc32(piece.encode('utf-8')) % 50_000}" if as_ids else piece

    content = []
    for i in range(0, len(text), 4):
        piece = text[i:i + 4]
        logprob = -0.05 - 0.1 * ((i // 4) % 5)
        alternatives = [(piece, logprob)] + [(f"{piece}~{j}", logprob - j) for j in range(1, top_logprobs)]
        content.append({
            "token": token(piece), "logprob": logprob, "bytes": list(piece.encode("utf-8")),
            "top_logprobs": [{"token": token(t), "logprob": v, "bytes": list(t.encode("utf-8"))}
                             for t, v in alternatives[:top_logprobs]],
        })
    return {"content": content, "refusal": None}


def default_responder(messages: list, index: int, body: dict) -> str:
    """`Answer <index>: <last user message>`: deterministic, and distinct for each of the n choices."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return f"Answer {index}: {content_text(message.get('content'))}"
    return f"Answer {index}: "


# ---------------------------------------------------------------------------------------------------
# rate limits


class _Bucket:
    """Continuously refilled: `capacity` per `window` seconds."""

    def __init__(self, capacity: float, window: float, now: float) -> None:
        self.capacity = capacity
        self.window = window
        self.level = float(capacity)
        self.stamp = now

    def resize(self, capacity: float, window: float) -> None:
        self.capacity, self.window = capacity, window
        self.level = min(self.level, capacity)

    def wait(self, cost: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / self.window)
        self.stamp = now
        if cost > self.capacity:
            return math.inf
        return 0.0 if self.level >= cost else (cost - self.level) * self.window / self.capacity

    def take(self, cost: float) -> None:
        self.level -= cost

    def remaining(self) -> int:
        return max(0, int(self.level))

    def reset_s(self) -> float:
        return max(0.0, (self.capacity - self.level) * self.window / self.capacity)


class _Quantum:
    """Fixed windows of `quantum` seconds (aligned to the server's start), each admitting `share` at most."""

    def __init__(self, share: float, quantum: float, start: float) -> None:
        self.share, self.quantum, self.start = share, quantum, start
        self.index, self.used = 0, 0.0

    def wait(self, cost: float, now: float) -> float:
        index = int((now - self.start) // self.quantum)
        if index != self.index:
            self.index, self.used = index, 0.0
        if self.used + cost <= self.share or (self.used == 0 and cost > self.share):
            return 0.0  # a request larger than a window's share goes through an empty window alone
        return self.start + (index + 1) * self.quantum - now

    def take(self, cost: float) -> None:
        self.used += cost


class _Sliding:
    """Sliding log: the admitted cost of the last `window` seconds never exceeds `capacity`."""

    def __init__(self, capacity: float, window: float, now: float) -> None:
        self.capacity = capacity
        self.window = window
        self.log: deque = deque()
        self.used = 0.0
        self.now = now

    def resize(self, capacity: float, window: float) -> None:
        self.capacity, self.window = capacity, window

    def wait(self, cost: float, now: float) -> float:
        self.now = now
        log, horizon = self.log, now - self.window
        while log and log[0][0] <= horizon:
            self.used -= log.popleft()[1]
        if cost > self.capacity:
            return math.inf
        excess = self.used + cost - self.capacity
        if excess <= 0:
            return 0.0
        freed = 0.0
        for stamp, amount in log:
            freed += amount
            if freed >= excess:
                return stamp + self.window - now
        return self.window

    def take(self, cost: float) -> None:
        if cost:
            self.log.append((self.now, cost))
            self.used += cost

    def remaining(self) -> int:
        return max(0, int(self.capacity - self.used))

    def reset_s(self) -> float:
        return max(0.0, self.log[-1][0] + self.window - self.now) if self.log else 0.0


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: '120ms', '1s', '1.5s', '6m0s', '1h2m3s'."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{secs_text}"
    if minutes:
        return f"{int(minutes)}m{secs_text}"
    return secs_text


def rfc3339_after(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + math.ceil(seconds)))


# bucket name → config attribute, OpenAI header family ("" = none), Anthropic header family
_LIMITS = (
    ("requests", "rpm", "requests", "requests"),
    ("tokens", "tpm", "tokens", "tokens"),
    ("input_tokens", "input_tpm", "", "input-tokens"),
    ("output_tokens", "output_tpm", "", "output-tokens"),
)


# ---------------------------------------------------------------------------------------------------
# the server


class _Parsed(NamedTuple):
    """A chat request that passed `ChatServer._validate` (Anthropic: n = 1, top_logprobs = None)."""
    messages: list
    n: int
    max_tokens: int | None
    top_logprobs: int | None
    input_tokens: int


class ChatServer:
    """The chat endpoints. `ChatServer(FakeConfig(...))` or `ChatServer(latency_s=..., rpm=...)`.

    Threaded: `start()` / `stop()` or `with ChatServer(...) as server:`.
    In a running loop: `await listen()` / `await aclose()`, `async with`, or `await serve()` (until stopped).
    """

    def __init__(self, config: FakeConfig | None = None, **options: Any) -> None:
        config = config if config is not None else FakeConfig()
        self.config = replace(config, **options) if options else config
        self.stats = FakeStats(self.config.keep_bodies)
        self.port: int | None = None
        self._rng = random.Random(self.config.seed)
        self._lifetime = 0
        self._slots: list[float] = []  # capacity: when each serving slot is next free
        self._limits: dict[str, Any] = {}
        self._quanta: dict[str, _Quantum] = {}
        self._started = time.monotonic()  # the quantum windows are aligned to it
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_Connection] = set()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._warned = False
        self.batches: Any = None  # the batch APIs, set by whoever assembles the fake (fakes.app)
        self._prompt_cache: OrderedDict[str, None] = OrderedDict()  # digests of cached prompt prefixes
        self._held: set[_Connection] = set()  # streams waiting for release_streams()

    # -- addresses -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake server is not listening yet")
        return f"http://{HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def release_streams(self) -> None:
        """Let the streams held by `stream_hold_after` go on (from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        held, self._held = self._held, set()
        for conn in held:
            conn.release()

    def reset_stats(self) -> None:
        """Clear the stats; request sequence numbers (for `faults`) start again at 1."""
        self.stats.reset()

    # -- lifecycle in a running loop ---------------------------------------------------------------

    async def listen(self) -> None:
        """Start listening in the running loop; returns once the port is bound."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), HOST, self.config.port, reuse_address=True, backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        """Listen (if not yet) and serve until `stop()` is called or this task is cancelled."""
        await self.listen()
        try:
            await self._stopped.wait()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            conn.abort()
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(server.wait_closed(), 2)
        except asyncio.TimeoutError:
            pass

    async def __aenter__(self) -> "ChatServer":
        await self.listen()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- lifecycle in a thread of its own ----------------------------------------------------------

    def start(self) -> "ChatServer":
        """Serve from a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.listen())
                except BaseException as exc:  # noqa: BLE001 - handed to start()
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                loop.run_until_complete(self.serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fakeserver", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving (from any thread): drops open connections and, if threaded, joins the thread."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopped.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- one request -----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[float, Reply]:
        """Decide the answer to one request: (delay in seconds, reply)."""
        config, stats = self.config, self.stats
        with stats.lock:
            stats.total += 1
            seq = stats.total
        self._lifetime += 1
        delay = config.latency_s
        route = path.split("?", 1)[0].rstrip("/")
        batch_route = self.batches.route(route) if self.batches is not None else None
        provider = (batch_route[0] if batch_route else "openai" if route.endswith("/chat/completions")
                    else "anthropic" if route.endswith("/messages") else "")

        if self._lifetime > config.max_requests:
            with stats.lock:
                stats.over_max_requests += 1
            if not self._warned:
                self._warned = True
                print(f"fakeserver: more than max_requests={config.max_requests} requests; answering 503",
                      file=sys.stderr, flush=True)
            return delay, self.error(provider or "openai", 503, "fake server: max_requests exceeded")
        if batch_route is not None:  # no latency, faults or rate limits: see fakes/batch.py
            return 0.0, self.batches.handle(batch_route, method, path, headers, raw)
        if not provider:
            return delay, self.error("openai", 404, f"Unknown request URL: {method} {route}")
        if method != "POST":
            return delay, self.error(provider, 405, f"method {method} not allowed on {route}")
        try:
            body = json.loads(raw)
        except ValueError:
            return delay, self.error(provider, 400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return delay, self.error(provider, 400, "request body must be a JSON object")
        with stats.lock:
            stats.bodies.append(body)

        if config.api_key is not None and not self._authorized(provider, headers, config.api_key):
            return delay, self.error(provider, 401, "Incorrect API key provided" if provider == "openai"
                                     else "invalid x-api-key")

        fault, cut = config.faults.get(seq), None
        if fault is None and config.fault_rates:
            draw, edge = self._rng.random(), 0.0
            for kind, rate in list(config.fault_rates.items()):
                edge += rate
                if draw < edge:
                    fault = kind
                    break
        if fault is not None:
            with stats.lock:
                stats.faults[fault] += 1
            if fault == "drop":
                return delay, Reply(None, "drop")
            if fault == "malformed":
                return delay, http_reply(200, MALFORMED_BODY, ())
            if fault in ("slow", "timeout"):
                delay += config.slow_s
            elif fault in ("stream_error", "stream_drop"):
                cut = fault
            elif fault.isdigit() and 400 <= int(fault) <= 599:
                status = int(fault)
                extra = self._retry_headers(config.retry_after) if status == 429 else ()
                return delay, self.error(provider, status, f"fake server: injected {status}", extra)
            else:
                return delay, self.error(provider, 500, f"fake server: unknown fault kind {fault!r}")

        reply = self._chat(provider, body, seq, cut)
        return self._queued(delay + reply.generation_s), reply

    def _queued(self, service_s: float) -> float:
        """With a capacity: the delay of a request served in the earliest free slot after those queued before it."""
        if not self.config.capacity:
            return service_s
        now = time.monotonic()
        with self.stats.lock:
            if len(self._slots) != self.config.capacity:
                self._slots = [now] * self.config.capacity
            start = max(now, heapq.heappop(self._slots))
            heapq.heappush(self._slots, start + service_s)
            self.stats.queue_waits.append(start - now)
        return start + service_s - now

    @staticmethod
    def _authorized(provider: str, headers: dict[str, str], key: str) -> bool:
        if headers.get("authorization") == "Bearer " + key:
            return True
        return provider == "anthropic" and headers.get("x-api-key") == key

    def _chat(self, provider: str, body: dict, seq: int, cut: str | None = None) -> Reply:
        """An online answer: validate, charge the rate limits, and only then run the responder."""
        parsed = self._validate(provider, body)
        if isinstance(parsed, str):
            return self.error(provider, 400, parsed)
        admitted, headers = self._admit(provider, parsed.input_tokens, parsed.n * (parsed.max_tokens or 0))
        if not admitted:
            return headers
        answer = self._build(provider, body, parsed,
                             f"chatcmpl-fake{seq:08d}" if provider == "openai" else f"msg_fake{seq:016x}")
        if isinstance(answer, str):
            return self.error(provider, 500, answer, headers)
        if provider == "openai" and body.get("stream") is True:
            return self._streamed(body, answer, headers, cut)
        reply = self._success(body, answer, headers)
        if self.config.stream_chunk_s > 0 and provider == "openai":
            reply.generation_s = self.config.stream_chunk_s * (len(stream_plan(answer, body).parts) - 1)
        return reply

    @staticmethod
    def _validate(provider: str, body: dict) -> _Parsed | str:
        """The parsed chat request, or the message of its 400. Shared by the online and batch endpoints."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            return "messages: a list is required"
        if provider == "anthropic":
            n, top_logprobs, max_tokens = 1, None, body.get("max_tokens")
            if max_tokens is not None and not isinstance(max_tokens, int):
                return "max_tokens: an integer is required"
        else:
            n = body.get("n") or 1
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
            if not isinstance(n, int) or n < 1 or not (max_tokens is None or isinstance(max_tokens, int)):
                return "n and max_tokens must be positive integers"
            top_logprobs = body.get("top_logprobs")
            if top_logprobs is not None and (not body.get("logprobs") or not isinstance(top_logprobs, int)
                                             or not 0 <= top_logprobs <= 20):
                return "top_logprobs must be an integer in [0, 20] and needs logprobs: true"
        problem = structured.request_problem(provider, body)
        if problem:
            return problem
        chars = "".join(content_text(m.get("content")) for m in messages if isinstance(m, dict))
        if provider == "anthropic":
            chars = content_text(body.get("system")) + chars
        return _Parsed(messages, n, max_tokens, top_logprobs, count_tokens(chars))

    def _build(self, provider: str, body: dict, parsed: _Parsed, answer_id: str) -> dict | str:
        """Run the responder and build the chat.completion / message with id `answer_id`; a string is the
        message of a 500 (the responder raised). Shared by the online and batch endpoints."""
        messages, n, max_tokens, top_logprobs, input_tokens = parsed
        choices, completion_tokens = [], 0
        for index in range(n):
            text, reason, tokens = self._answer(messages, index, body, max_tokens, provider)
            if text is None:
                return reason
            completion_tokens += tokens
            logprobs = None
            if provider == "openai" and body.get("logprobs"):
                logprobs = fake_logprobs(text, top_logprobs or 0, bool(body.get("return_tokens_as_token_ids")))
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "finish_reason": reason, "logprobs": logprobs})
        caching = self.config.prompt_cache_min_tokens is not None
        read, written = self._cached(provider, body, messages) if caching else (0, 0)
        if provider == "anthropic":  # n = 1: the one choice's text, reason and tokens
            content: list[dict] = [{"type": "text", "text": text}]
            stop_reason = "max_tokens" if reason == "length" else "end_turn"
            tool = structured.forced_tool(body)
            if tool is not None:  # cut short, the call has no input yet
                content = [{"type": "tool_use", "id": f"toolu_{answer_id}", "name": tool["name"],
                            "input": {} if reason == "length" else json.loads(text)}]
                stop_reason = "max_tokens" if reason == "length" else "tool_use"
            usage = {"input_tokens": input_tokens - read - written, "output_tokens": tokens}
            if caching:
                usage.update(cache_creation_input_tokens=written, cache_read_input_tokens=read)
            return {
                "id": answer_id, "type": "message", "role": "assistant",
                "content": content, "model": body.get("model", "fake"),
                "stop_reason": stop_reason, "stop_sequence": None,
                "usage": usage,
            }
        usage = {"prompt_tokens": input_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": input_tokens + completion_tokens}
        if caching:
            usage["prompt_tokens_details"] = {"cached_tokens": read}
        return {
            "id": answer_id, "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"), "choices": choices, "usage": usage,
        }

    def _cached(self, provider: str, body: dict, messages: list) -> tuple[int, int]:
        """(tokens read from the prompt cache, tokens written to it) for one prompt; remembers its prefixes.
        See the module docstring for the rules of each provider."""
        blocks = [(m.get("role"), content_text(m.get("content"))) if isinstance(m, dict) else ("", "")
                  for m in messages]
        if provider == "anthropic" and body.get("system"):
            blocks.insert(0, ("system", content_text(body.get("system"))))
        least = self.config.prompt_cache_min_tokens or 0
        digest, text, prefixes = hashlib.sha256(provider.encode()), "", []
        for role, content in blocks:
            digest.update(json.dumps([role, content]).encode() + b"\0")
            text += content
            prefixes.append((digest.hexdigest(), count_tokens(text)))
        # OpenAI caches any prefix, the whole prompt too; Anthropic up to its breakpoint, before the last message.
        usable = [(key, tokens) for key, tokens in (prefixes if provider == "openai" else prefixes[:-1])
                  if tokens >= least]
        read = max((tokens for key, tokens in usable if key in self._prompt_cache), default=0)
        written = 0
        if provider == "anthropic" and usable and usable[-1][0] not in self._prompt_cache:
            written = usable[-1][1] - read
        for key, _ in (usable if provider == "openai" else usable[-1:]):
            self._prompt_cache[key] = None
            self._prompt_cache.move_to_end(key)
        while len(self._prompt_cache) > PROMPT_CACHE_ENTRIES:
            self._prompt_cache.popitem(last=False)
        return read, written

    def _answer(self, messages: list, index: int, body: dict, max_tokens: int | None, provider: str):
        """(text, finish_reason, tokens), or (None, error message, 0) when the responder raised or its answer
        breaks the schema the request holds answers to (fakes/structured.py)."""
        try:
            answer = (self.config.responder or default_responder)(messages, index, body)
            text = "" if answer is None else answer if isinstance(answer, str) else json.dumps(answer)
        except Exception as exc:  # noqa: BLE001 - a test's responder bug becomes a 500
            return None, f"fake server: responder raised {type(exc).__name__}: {exc}", 0
        schema = structured.required_schema(provider, body)
        if schema is not None:
            _, problem = structured.answer_value(text, schema)
            if problem:
                return None, f"fake server: the responder's structured answer is wrong: {problem}", 0
        tokens = count_tokens(text)
        if max_tokens is not None and tokens > max_tokens:
            return text[: max_tokens * 4], "length", max_tokens
        return text, "stop", tokens

    def _success(self, body: dict, answer: dict, headers: list) -> Reply:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        reply = http_reply(200, json.dumps(answer, separators=(",", ":")).encode(), headers)
        reply.digest = digest
        return reply

    def _streamed(self, body: dict, answer: dict, headers: list, cut: str | None) -> Reply:
        plan = stream_plan(answer, body, headers, cut, self.config.stream_cut_after)
        reply = Reply(plan.head, 200)
        reply.stream = plan
        if cut is None:  # a stream cut short was not answered
            reply.digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.stats.lock:
            self.stats.streams += 1
        return reply

    def _admit(self, provider: str, input_tokens: int, output_tokens: int):
        """(True, rate-limit headers) or (False, a 429 reply)."""
        config = self.config
        active = []
        now = time.monotonic()
        for name, attr, openai_family, anthropic_family in _LIMITS:
            limit = getattr(config, attr)
            family = openai_family if provider == "openai" else anthropic_family
            if not limit or not family:
                continue
            kind = _Sliding if config.rate_mode == "sliding" else _Bucket
            bucket = self._limits.get(name)
            if type(bucket) is not kind:
                bucket = self._limits[name] = kind(limit, config.rate_window_s, now)
            elif bucket.capacity != limit or bucket.window != config.rate_window_s:
                bucket.resize(limit, config.rate_window_s)
            cost = (1 if name == "requests" else input_tokens + output_tokens if name == "tokens"
                    else input_tokens if name == "input_tokens" else output_tokens)
            active.append((name, family, limit, bucket, cost, bucket.wait(cost, now)))
        if not active:
            return True, ()
        quantum = config.rate_quantum_s
        if quantum:  # the same limits, also in fixed windows of `quantum` seconds
            for i, (name, family, limit, bucket, cost, wait) in enumerate(active):
                window = self._quanta.get(name)
                share = limit * quantum / config.rate_window_s
                if window is None or window.share != share or window.quantum != quantum:
                    window = self._quanta[name] = _Quantum(share, quantum, self._started)
                active[i] = (name, family, limit, bucket, cost, max(wait, window.wait(cost, now)))
        worst = max(active, key=lambda item: item[5])
        with self.stats.lock:
            (self.stats.admitted_at if worst[5] <= 0 else self.stats.refused_at).append(now - self._started)
        if worst[5] <= 0:
            for name, _, _, bucket, cost, _ in active:
                bucket.take(cost)
                if quantum:
                    self._quanta[name].take(cost)
        headers = []
        for name, family, limit, bucket, _, _ in active:
            if provider == "openai":
                headers += [(f"x-ratelimit-limit-{family}", str(limit)),
                            (f"x-ratelimit-remaining-{family}", str(bucket.remaining())),
                            (f"x-ratelimit-reset-{family}", openai_duration(bucket.reset_s()))]
            else:
                headers += [(f"anthropic-ratelimit-{family}-limit", str(limit)),
                            (f"anthropic-ratelimit-{family}-remaining", str(bucket.remaining())),
                            (f"anthropic-ratelimit-{family}-reset", rfc3339_after(bucket.reset_s()))]
        if worst[5] <= 0:
            return True, headers
        name, _, limit, _, cost, wait = worst
        if wait == math.inf:
            wait = config.rate_window_s
            message = f"Request too large: {name} limit {limit} per {config.rate_window_s:g}s, requested {cost}."
        else:
            message = (f"Rate limit reached for {name}: limit {limit} per {config.rate_window_s:g}s, "
                       f"requested {cost}. Please try again in {wait:.3f}s.")
        return False, self.error(provider, 429, message, headers + self._retry_headers(wait))

    @staticmethod
    def _retry_headers(seconds: float) -> list:
        return [("retry-after", str(max(1, math.ceil(seconds)))),
                ("retry-after-ms", str(max(1, math.ceil(seconds * 1000))))]

    def error(self, provider: str, status: int, message: str, headers=()) -> Reply:
        code = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}.get(status)
        return http_reply(status, json.dumps(error_body(provider, status, message, code)).encode(), headers)

    def record(self, reply: Reply, delivered: bool) -> None:
        stats = self.stats
        with stats.lock:
            if not delivered:
                stats.client_gone += 1
                return
            stats.by_status[reply.status] += 1
            if reply.status == 429:
                stats.rate_limited += 1
            if reply.digest is not None:
                stats.answered[reply.digest] += 1


class _Connection(asyncio.Protocol):
    """One keep-alive connection. Requests are answered one at a time, in order."""

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: tuple | None = None     # (method, path, headers, body start, length or -1 for chunked, keep-alive)
        self.pending: Reply | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.continued = False
        self.streaming: Reply | None = None  # a streamed answer being sent
        self.part = 0                        # its next part
        self.released = False                # its hold is over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._unhold()
        if self.pending is not None:
            self.server.record(self.pending, delivered=False)
            self.pending = None
        self.server._conns.discard(self)

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._unhold()
        self.pending = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.pending is None and self.streaming is None:
            self._pump()

    def _pump(self) -> None:
        while self.pending is None and self.streaming is None and not self.closed:
            request = self._next_request()
            if request is None:
                return
            method, path, headers, body, keep_alive = request
            try:
                delay, reply = self.server.handle(method, path, headers, body)
            except Exception as exc:  # noqa: BLE001 - a bug here must not kill the connection silently
                delay, reply = 0.0, self.server.error("openai", 500, f"fake server bug: {type(exc).__name__}: {exc}")
            reply.close = reply.close or not keep_alive
            if delay > 0:
                self.pending = reply
                self.timer = asyncio.get_running_loop().call_later(delay, self._fire)
                return
            self._deliver(reply)

    def _fire(self) -> None:
        self.timer = None
        reply, self.pending = self.pending, None
        if reply is not None and not self.closed:
            self._deliver(reply)
            if self.streaming is None:
                self._pump()

    def _deliver(self, reply: Reply) -> None:
        if reply.data is None:  # "drop"
            self.server.record(reply, delivered=True)
            self.closed = True
            self.transport.abort()
            return
        if self.transport.is_closing():
            self.server.record(reply, delivered=False)
            self.closed = True
            return
        data = reply.data
        if reply.close:
            end = data.index(b"\r\n\r\n")
            data = data[:end] + b"\r\nconnection: close" + data[end:]
        # Count before writing: once a client holds the response, the stats already show it.
        self.server.record(reply, delivered=True)
        self.transport.write(data)
        if reply.stream is not None:
            self.streaming, self.part, self.released = reply, 0, False
            self._send_parts()
            return
        if reply.close:
            self.closed = True
            self.transport.close()

    def _send_parts(self) -> None:
        """The streamed answer's next parts: paced by `stream_chunk_s`, held by `stream_hold_after`."""
        self.timer = None
        reply, server = self.streaming, self.server
        assert reply is not None
        plan, config = reply.stream, server.config
        while self.part < len(plan.parts):
            if self.closed or self.transport.is_closing():
                self.streaming = None
                return
            hold = config.stream_hold_after
            if (hold is not None and not self.released and hold < len(plan.content_at)
                    and self.part == plan.content_at[hold]):
                server._held.add(self)
                with server.stats.lock:
                    server.stats.stream_chunks_held += len(plan.parts) - self.part
                return
            self.transport.write(plan.parts[self.part])
            self.part += 1
            with server.stats.lock:
                server.stats.stream_chunks_sent += 1
            if config.stream_chunk_s > 0 and self.part < len(plan.parts):
                self.timer = asyncio.get_running_loop().call_later(config.stream_chunk_s, self._send_parts)
                return
        self.streaming = None
        if plan.drop or reply.close:
            self.closed = True
            self.transport.abort() if plan.drop else self.transport.close()
            return
        self._pump()

    def release(self) -> None:
        """The hold is over: send the rest."""
        if self.streaming is None:
            return
        with self.server.stats.lock:
            self.server.stats.stream_chunks_held -= len(self.streaming.stream.parts) - self.part
        self.released = True
        self._send_parts()

    def _unhold(self) -> None:
        if self in self.server._held:
            self.server._held.discard(self)
            if self.streaming is not None:
                with self.server.stats.lock:
                    self.server.stats.stream_chunks_held -= len(self.streaming.stream.parts) - self.part
        self.streaming = None

    def _reject(self, status: int, message: str) -> None:
        reply = self.server.error("openai", status, message)
        reply.close = True
        self._deliver(reply)

    def _next_request(self):
        """(method, path, headers, body, keep_alive) when a whole request is buffered, else None."""
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    self._reject(431, "request headers too large")
                return None
            lines = buffer[:end].decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._reject(400, "malformed request line")
                return None
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            connection = headers.get("connection", "").lower()
            keep_alive = "close" not in connection if parts[2] == "HTTP/1.1" else "keep-alive" in connection
            if "chunked" in headers.get("transfer-encoding", "").lower():
                length = -1
            else:
                try:
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    self._reject(400, "bad content-length")
                    return None
                if length < 0 or length > MAX_BODY_BYTES:
                    self._reject(413, "request body too large")
                    return None
            self.head = (parts[0], parts[1], headers, end + 4, length, keep_alive)
            self.continued = False
        method, path, headers, start, length, keep_alive = self.head
        if length >= 0:
            if len(buffer) - start < length:
                self._maybe_continue(headers)
                return None
            body = bytes(buffer[start:start + length])
            consumed = start + length
        else:
            parsed = self._dechunk(start)
            if parsed is None:
                self._maybe_continue(headers)
                return None
            body, consumed = parsed
        del buffer[:consumed]
        self.head = None
        return method, path, headers, body, keep_alive

    def _maybe_continue(self, headers: dict) -> None:
        if not self.continued and headers.get("expect", "").lower() == "100-continue":
            self.continued = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dechunk(self, pos: int):
        """A chunked body from `pos`: (body, end offset), or None if it is not all here yet."""
        buffer, chunks = self.buffer, []
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buffer[pos:eol]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._reject(400, "bad chunk size")
                return None
            pos = eol + 2
            if size == 0:
                while True:  # trailers, up to the empty line
                    eol = buffer.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    if eol == pos:
                        return b"".join(chunks), eol + 2
                    pos = eol + 2
            if len(buffer) < pos + size + 2:
                return None
            chunks.append(bytes(buffer[pos:pos + size]))
            pos += size + 2
            if sum(map(len, chunks)) > MAX_BODY_BYTES:
                self._reject(413, "request body too large")
                return None
