"""A streamed OpenAI chat completion (`stream: true`): the answer the fake built, sent as server-sent events.

Each choice in turn: a first chunk with the role, then its text cut into 4-character tokens, one chunk each
(with that token's `logprobs.content` entry when the request asked for logprobs), then a chunk with its
finish_reason; a usage chunk (`choices: []`) when `stream_options.include_usage` is set; then `data: [DONE]`.
Every event is one HTTP chunk of a `Transfer-Encoding: chunked` response, so a client reads each as it is sent.

A stream may be cut after `cut_after` content chunks: "stream_error" sends OpenAI's error event (`data:
{"error": {...}}`) and ends the body without [DONE]; "stream_drop" closes the connection there. How the chunks
are paced and held is the connection's business (fakes/server.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from fakes.common import error_body

TOKEN_CHARS = 4


@dataclass
class StreamPlan:
    head: bytes                 # the status line and headers
    parts: list[bytes]          # each an HTTP chunk, the last the terminating one (or none for a drop)
    content_at: list[int]       # the index in `parts` of each content chunk
    drop: bool = False          # close the connection after the last part


def _event(payload: object) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    return _chunk(b"data: " + data + b"\n\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stream_plan(answer: dict, body: dict, headers=(), cut: str | None = None, cut_after: int = 1) -> StreamPlan:
    """The events of `answer` (a chat.completion the fake built for `body`), cut as `cut` says."""
    head = [("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
             "transfer-encoding: chunked\r\n")]
    head += [f"{name}: {value}\r\n" for name, value in headers]
    head.append("\r\n")
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"], "system_fingerprint": None}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    plan = StreamPlan("".join(head).encode("latin-1"), [], [])

    def add(choices: list, usage: object = None) -> None:
        event = {**base, "choices": choices}
        if include_usage:
            event["usage"] = usage
        plan.parts.append(_event(event))

    for choice in answer["choices"]:
        index, text = choice["index"], choice["message"]["content"]
        entries = (choice.get("logprobs") or {}).get("content")
        add([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        for position, start in enumerate(range(0, len(text), TOKEN_CHARS)):
            if cut is not None and len(plan.content_at) == cut_after:
                if cut == "stream_drop":
                    plan.drop = True
                    return plan
                plan.parts.append(_event(error_body("openai", 500, "fake server: injected stream_error",
                                                   "stream_error")))
                plan.parts.append(_chunk(b""))
                return plan
            logprobs = {"content": [entries[position]], "refusal": None} if entries else None
            plan.content_at.append(len(plan.parts))
            add([{"index": index, "delta": {"content": text[start:start + TOKEN_CHARS]}, "logprobs": logprobs,
                  "finish_reason": None}])
        add([{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}])
    if include_usage:
        add([], answer["usage"])
    plan.parts.append(_event(b"[DONE]"))
    plan.parts.append(_chunk(b""))
    return plan
