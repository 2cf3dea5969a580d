"""What the fake's chat server (fakes/server.py) and its batch APIs (fakes/batch.py) share.

The configuration and the stats of one fake server, the HTTP reply they both build, and the providers'
error vocabulary. Stdlib only; imports nothing of the project, so neither half needs the other.
"""
from __future__ import annotations

import json
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

HOST = "127.0.0.1"

Responder = Callable[[list, int, dict], Any]  # the answer: text, or a JSON value (a dict) sent as JSON

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 529: "Overloaded",
}
# status → (OpenAI error type, Anthropic error type)
ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    503: ("server_error", "overloaded_error"),
    529: ("server_error", "overloaded_error"),
}


@dataclass
class FakeConfig:
    port: int = 0                                  # 0: any free port
    latency_s: float = 0.0                         # before every response
    api_key: str | None = None                     # required when set (Bearer / x-api-key)
    rpm: int | None = None
    tpm: int | None = None                         # combined tokens (OpenAI tokens, anthropic-ratelimit-tokens)
    input_tpm: int | None = None                   # Anthropic input tokens
    output_tpm: int | None = None                  # Anthropic output tokens
    # A server that queues (vLLM, SGLang): at most this many chat requests are served at once, each for latency_s;
    # the others wait their turn, first come first served, so more concurrency adds latency, not throughput.
    capacity: int | None = None
    rate_window_s: float = 60.0
    rate_mode: str = "bucket"                      # "bucket" or "sliding"
    # Also enforce each limit in fixed windows this long (limit * quantum / rate_window_s per window), as
    # providers quantise a per-minute limit into seconds; the headers still describe the per-minute limit.
    rate_quantum_s: float | None = None
    faults: dict[int, str] = field(default_factory=dict)
    fault_rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    retry_after: float = 1.0                       # seconds, for injected 429s
    slow_s: float = 5.0                            # extra delay of "slow" / "timeout"
    max_requests: int = 200_000                    # lifetime bound: past it every request gets 503
    responder: Responder | None = None             # (messages, index, body) -> text
    keep_bodies: int = 1000                        # how many request bodies `stats.bodies` keeps
    batch_delay_s: float = 0.0                     # a batch is in progress this long after creation
    # asked per batch item as it is processed: (custom_id, attempt) -> None | "error" | "invalid" | "expired"
    batch_fault: Callable[[str, int], str | None] | None = None
    # Prompt caching (see fakes/server.py): None reports none; a number is the fewest tokens a cached prefix has.
    prompt_cache_min_tokens: int | None = None
    # One entry per batch create, first to last: the batch is created, then its answer is lost: "drop"
    # (the connection closes) or an HTTP status as digits ("500"). Entries are used up.
    batch_create_lost: list[str] = field(default_factory=list)
    # Streamed answers (`stream: true`, OpenAI; fakes/streaming.py): the pause between two chunks; after this many
    # content chunks a stream holds the rest until `server.release_streams()`; where a "stream_error" or
    # "stream_drop" fault cuts a stream (after this many content chunks). A whole (not streamed) answer waits as
    # long as its stream would have paused in all, as a server generating it would take.
    stream_chunk_s: float = 0.0
    stream_hold_after: int | None = None
    stream_cut_after: int = 1


class FakeStats:
    """What the server saw. Updated on the server's thread under `lock`; `snapshot()` copies it safely.

    total: requests received since the last reset (their sequence numbers are 1..total).
    by_status: responses sent, by HTTP status (int), plus "drop" for dropped connections.
    rate_limited: 429 responses sent (enforced or injected).
    answered: for real 200 answers, sha256 of `json.dumps(body, sort_keys=True)` → times answered.
    bodies: the last `keep_bodies` parsed JSON request bodies, any outcome.
    faults: injected faults by kind.
    over_max_requests: requests refused because the lifetime `max_requests` was passed.
    client_gone: responses not sent because the client had closed the connection first.
    queue_waits: with a capacity, each chat request's wait for a serving slot, in arrival order.
    admitted_at, refused_at: with rate limits set, the seconds since the server started at which each chat
    request was admitted by them, or refused (429), in arrival order: requests per window, on the server's clock.
    batches_created, files_uploaded: batch endpoints' creations (both providers) and accepted uploads.
    streams: streamed answers begun; stream_chunks_sent: their chunks (events) written so far; stream_chunks_held:
    chunks of streams held by `stream_hold_after`, not sent yet (until `release_streams()`).
    batch_items: custom_id → times it was in a created batch; batch_answered: custom_id → times a batch
    answered it successfully (batch answers are not in `answered`, which counts online bodies).
    """

    def __init__(self, keep_bodies: int = 1000) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.by_status: Counter = Counter()
        self.rate_limited = 0
        self.answered: Counter = Counter()
        self.bodies: deque = deque(maxlen=keep_bodies)
        self.faults: Counter = Counter()
        self.over_max_requests = 0
        self.client_gone = 0
        self.queue_waits: list[float] = []  # capacity: how long each chat request waited for a serving slot
        self.admitted_at: list[float] = []  # rate limits: when each request was admitted (s since start)
        self.refused_at: list[float] = []   # rate limits: when each request was refused with a 429
        self.streams = 0
        self.stream_chunks_sent = 0
        self.stream_chunks_held = 0
        self.batches_created = 0
        self.files_uploaded = 0
        self.batch_items: Counter = Counter()
        self.batch_answered: Counter = Counter()

    def reset(self) -> None:
        with self.lock:
            self.total = 0
            self.by_status.clear()
            self.rate_limited = 0
            self.answered.clear()
            self.bodies.clear()
            self.faults.clear()
            self.over_max_requests = 0
            self.client_gone = 0
            self.queue_waits.clear()
            self.admitted_at.clear()
            self.refused_at.clear()
            self.streams = self.stream_chunks_sent = self.stream_chunks_held = 0
            self.batches_created = 0
            self.files_uploaded = 0
            self.batch_items.clear()
            self.batch_answered.clear()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "total": self.total,
                "by_status": dict(self.by_status),
                "rate_limited": self.rate_limited,
                "answered": dict(self.answered),
                "bodies": list(self.bodies),
                "faults": dict(self.faults),
                "over_max_requests": self.over_max_requests,
                "client_gone": self.client_gone,
                "queue_waits": list(self.queue_waits),
                "admitted_at": list(self.admitted_at),
                "refused_at": list(self.refused_at),
                "streams": self.streams,
                "stream_chunks_sent": self.stream_chunks_sent,
                "stream_chunks_held": self.stream_chunks_held,
                "batches_created": self.batches_created,
                "files_uploaded": self.files_uploaded,
                "batch_items": dict(self.batch_items),
                "batch_answered": dict(self.batch_answered),
            }

    def duplicates(self) -> dict[str, int]:
        """Request bodies (by hash) that were answered 200 more than once."""
        with self.lock:
            return {digest: count for digest, count in self.answered.items() if count > 1}

    def __repr__(self) -> str:
        return (f"FakeStats(total={self.total}, by_status={dict(self.by_status)}, "
                f"rate_limited={self.rate_limited}, answered={len(self.answered)})")


class Reply:
    """One response, as bytes ready to write, plus what `FakeServer.record` counts."""

    __slots__ = ("data", "status", "close", "digest", "stream", "generation_s")

    def __init__(self, data: bytes | None, status: int | str, close: bool = False, digest: str | None = None):
        self.data = data          # None: drop the connection
        self.status = status
        self.close = close
        self.digest = digest      # set on real 200 answers
        self.stream: Any = None   # a streamed answer: the fakes.streaming.StreamPlan sent after `data` (its head)
        self.generation_s = 0.0   # a whole answer's wait for the chunks a stream of it would have paused between


def error_body(provider: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The provider's error payload (`code` goes into OpenAI's, as its `error.code`)."""
    openai_type, anthropic_type = ERROR_TYPES.get(status, ("server_error", "api_error"))
    if provider == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": message}}
    return {"error": {"message": message, "type": openai_type, "param": None, "code": code}}


def http_reply(status: int, payload: bytes, headers=(), content_type: str = "application/json") -> Reply:
    """An HTTP/1.1 response: status line, content-type, content-length, `headers` (name, value), body."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(payload)}\r\n"]
    for name, value in headers:
        head.append(f"{name}: {value}\r\n")
    head.append("\r\n")
    return Reply("".join(head).encode("latin-1") + payload, status)


def json_reply(payload: Any) -> Reply:
    """A 200 with `payload` as compact JSON."""
    return http_reply(200, json.dumps(payload, separators=(",", ":")).encode())
