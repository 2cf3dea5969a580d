"""The batch APIs of the fake server: OpenAI Files + Batches and Anthropic Message Batches.

`fakes.FakeServer` (fakes/app.py) gives its chat server (fakes/server.py) one `FakeBatches`
(`server.batches`), which is handed every request whose path `route()` recognises. It runs on the
server's event-loop thread, so its state needs no lock (the stats do). It does not import the chat
server: it uses the server it is given for the config, the stats, the URL, the API-key check, the
error replies, and the online endpoints' `_validate` / `_build` (so items are answered alike).

Time: a batch is in progress for `config.batch_delay_s` (read at creation) and its items are processed
in input order on a linear schedule (OpenAI: all by 80% of the delay, then "finalizing"), lazily, when
someone looks. Processing an item asks `config.batch_fault(custom_id, attempt)` and answers with the
same responder, token counts and max_tokens cut as the online endpoints, without their rate limits,
faults table or latency; the request counts show the processed items by outcome (Anthropic's API keeps
them at zero until the end; the fake shows progress). Once the delay has passed, the results are written
once, shuffled (seeded by `config.seed` and the batch id), as the real APIs promise no order. A cancel
stops processing where the schedule stands: later items end "canceled" (OpenAI: in the error file with
code "batch_cancelled").

Ids are random (`batch_…`, `file-…`, `msgbatch_…`), so a stale id from another server is a 404 here.

Lost answers: while `config.batch_create_lost` holds entries, each batch create (either provider) takes
the first one: the batch is created as usual, and then its answer is replaced by a dropped connection
("drop") or an error status ("500"): the provider accepted a batch whose id the client never saw.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import math
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fakes.common import Reply, error_body, http_reply, json_reply

CHAT_ENDPOINT = "/v1/chat/completions"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
DAY_S = 24 * 3600
FINALIZE_AT = 0.8  # OpenAI: the share of the delay spent "in_progress"; the rest is "finalizing"
ITEM_FAULTS = {"error": (500, "fake server: injected batch item error"),
               "invalid": (400, "fake server: injected invalid batch item")}
ITEM_ENDINGS = {  # OpenAI error-file entries of items that never ran
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "canceled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}


def _hex(size: int = 24) -> str:
    return uuid.uuid4().hex[:size]


def _rfc3339(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat().replace("+00:00", "Z")


def jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)


class BatchError(Exception):
    """A request the batch endpoints refuse: becomes the provider's error reply."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    requests: list = field(default_factory=list)  # (custom_id, body) of a batch input file

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


@dataclass
class _Batch:
    id: str
    provider: str
    items: list                      # (custom_id, body, attempt)
    created_at: float                # wall clock
    started: float                   # monotonic
    delay_s: float
    input_file_id: str | None = None
    metadata: dict | None = None
    cancelled_at: float | None = None
    processed_before_cancel: int | None = None
    lines: list = field(default_factory=list)            # (outcome, results line) of processed items
    outcomes: Counter = field(default_factory=Counter)   # succeeded / errored / expired / canceled
    tokens: Counter = field(default_factory=Counter)     # input / output, of OpenAI answers
    ended_at: float | None = None    # set once the results are written
    results: bytes = b""             # Anthropic results JSONL
    output_file_id: str | None = None
    error_file_id: str | None = None

    def progress(self) -> float:
        """Elapsed share of the delay (may exceed 1)."""
        return 1.0 if self.delay_s <= 0 else max(0.0, (time.monotonic() - self.started) / self.delay_s)

    def due(self, share: float) -> int:
        """Items due by now, when processing ends at `share` of the delay."""
        if self.processed_before_cancel is not None:
            return self.processed_before_cancel
        return min(len(self.items), math.floor(len(self.items) * self.progress() / share))


class FakeBatches:
    """Files, batches and their results for one `FakeServer`."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self.attempts: Counter = Counter()  # custom_id → batches that held it, over the server's lifetime

    @staticmethod
    def route(path: str) -> tuple[str, str, list[str]] | None:
        """(provider, "batches" | "files", the segments after it) for a batch path, else None.

        `/v1/messages/batches/...` is Anthropic's, `/v1/batches/...` and `/v1/files/...` OpenAI's; the
        online `/v1/messages` and `/v1/chat/completions` are not batch paths.
        """
        parts = path.strip("/").split("/")
        for i in range(max(0, len(parts) - 3), len(parts)):
            if parts[i] == "files":
                return "openai", "files", parts[i + 1:]
            if parts[i] == "batches":
                return ("anthropic" if i and parts[i - 1] == "messages" else "openai"), "batches", parts[i + 1:]
        return None

    def handle(self, route: tuple[str, str, list[str]], method: str, path: str, headers: dict[str, str],
               raw: bytes) -> Reply:
        provider, kind, rest = route
        server = self.server
        handlers = self._handlers(provider, kind, rest)
        if not handlers:
            return server.error(provider, 404, f"Unknown request URL: {method} {urlsplit(path).path}")
        handler = handlers.get(method)
        if handler is None:
            return server.error(provider, 405, f"method {method} not allowed on {urlsplit(path).path}")
        key = server.config.api_key
        if key is not None and not server._authorized(provider, headers, key):
            return server.error(provider, 401, "Incorrect API key provided" if provider == "openai"
                                else "invalid x-api-key")
        query = {name: values[-1] for name, values in parse_qs(urlsplit(path).query).items()}
        try:
            return handler(rest[0] if rest else "", query, headers, raw)
        except BatchError as exc:
            return server.error(provider, exc.status, str(exc))

    def _handlers(self, provider: str, kind: str, rest: list[str]) -> dict[str, Any]:
        action = rest[1] if len(rest) == 2 else ""
        if len(rest) > 2 or (len(rest) == 2 and not action) or (rest and not rest[0]):
            return {}
        if kind == "files":
            return ({"POST": self._upload} if not rest else
                    {"GET": self._file_info, "DELETE": self._file_delete} if len(rest) == 1 else
                    {"GET": self._file_content} if action == "content" else {})
        if provider == "openai":
            return ({"POST": self._openai_create, "GET": self._openai_list} if not rest else
                    {"GET": self._openai_retrieve} if len(rest) == 1 else
                    {"POST": self._openai_cancel} if action == "cancel" else {})
        return ({"POST": self._anthropic_create, "GET": self._anthropic_list} if not rest else
                {"GET": self._anthropic_retrieve} if len(rest) == 1 else
                {"POST": self._anthropic_cancel} if action == "cancel" else
                {"GET": self._anthropic_results} if action == "results" else {})

    # -- shared ----------------------------------------------------------------------------------------

    @staticmethod
    def _json(raw: bytes) -> dict:
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise BatchError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BatchError(400, "request body must be a JSON object")
        return body

    def _batch(self, provider: str, batch_id: str) -> _Batch:
        batch = self.batches.get(batch_id)
        if batch is None or batch.provider != provider:
            raise BatchError(404, f"No batch found with id '{batch_id}'.")
        return batch

    def _new_batch(self, provider: str, prefix: str, requests: list, **fields: Any) -> _Batch:
        items = []
        for custom_id, body in requests:
            self.attempts[custom_id] += 1
            items.append((custom_id, body, self.attempts[custom_id]))
        batch = _Batch(id=prefix + _hex(), provider=provider, items=items, created_at=time.time(),
                       started=time.monotonic(), delay_s=max(0.0, float(self.server.config.batch_delay_s)),
                       **fields)
        self.batches[batch.id] = batch
        stats = self.server.stats
        with stats.lock:
            stats.batches_created += 1
            stats.batch_items.update(custom_id for custom_id, _ in requests)
        return batch

    def _lost(self, provider: str) -> Reply | None:
        """The answer that replaces a create's when `config.batch_create_lost` says it is lost (the batch exists)."""
        lost = self.server.config.batch_create_lost
        if not lost:
            return None
        kind = lost.pop(0)
        with self.server.stats.lock:
            self.server.stats.faults[f"batch_create_{kind}"] += 1
        if kind == "drop":
            return Reply(None, "drop")
        status = int(kind) if kind.isdigit() else 500
        return self.server.error(provider, status, f"fake server: injected {kind} after the batch was created")

    def _page(self, provider: str, query: dict, after_key: str, before_key: str, most: int) -> dict[str, Any]:
        """One page of this provider's batches, newest first."""
        newest = [batch for batch in reversed(self.batches.values()) if batch.provider == provider]
        ids = [batch.id for batch in newest]
        try:
            limit = int(query.get("limit", 20))
        except ValueError:
            raise BatchError(400, "limit: an integer is required") from None
        if not 1 <= limit <= most:
            raise BatchError(400, f"limit: must be in [1, {most}]")
        cursor = query.get(after_key) or query.get(before_key)
        if cursor is not None and cursor not in ids:
            raise BatchError(400, f"unknown pagination cursor '{cursor}'")
        if query.get(after_key):
            start = ids.index(cursor) + 1
            page, has_more = newest[start:start + limit], start + limit < len(newest)
        elif query.get(before_key):
            end = ids.index(cursor)
            page, has_more = newest[max(0, end - limit):end], end > limit
        else:
            page, has_more = newest[:limit], limit < len(newest)
        view = self._openai_view if provider == "openai" else self._anthropic_view
        return {"data": [view(batch) for batch in page], "has_more": has_more,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    def _advance(self, batch: _Batch, upto: int) -> None:
        """Process the items up to index `upto` (in input order) that are not processed yet."""
        config = self.server.config
        answer = self._openai_item if batch.provider == "openai" else self._anthropic_item
        for custom_id, body, attempt in batch.items[len(batch.lines):upto]:
            fault = config.batch_fault(custom_id, attempt) if config.batch_fault else None
            outcome, line, tokens = answer(custom_id, body, fault)
            batch.lines.append((outcome, line))
            batch.outcomes[outcome] += 1
            batch.tokens.update(tokens)
            if outcome == "succeeded":
                with self.server.stats.lock:
                    self.server.stats.batch_answered[custom_id] += 1

    def _finish(self, batch: _Batch) -> None:
        """Process what is due, cancel the rest, and write the results (once)."""
        if batch.ended_at is not None:
            return
        answer = self._openai_item if batch.provider == "openai" else self._anthropic_item
        self._advance(batch, batch.due(1.0))
        for custom_id, body, _ in batch.items[len(batch.lines):]:
            batch.lines.append(answer(custom_id, body, "canceled")[:2])
            batch.outcomes["canceled"] += 1
        lines = list(batch.lines)
        random.Random(f"{self.server.config.seed}:{batch.id}").shuffle(lines)
        if batch.provider == "openai":
            output = [line for outcome, line in lines if outcome == "succeeded"]
            errors = [line for outcome, line in lines if outcome != "succeeded"]
            batch.output_file_id = self._store(f"{batch.id}_output.jsonl", jsonl(output)) if output else None
            batch.error_file_id = self._store(f"{batch.id}_error.jsonl", jsonl(errors)) if errors else None
        else:
            batch.results = jsonl([line for _, line in lines])
        batch.ended_at = batch.cancelled_at if batch.cancelled_at is not None else batch.created_at + batch.delay_s

    def _store(self, filename: str, data: bytes) -> str:
        file = _File("file-" + _hex(), filename, "batch_output", data, int(time.time()))
        self.files[file.id] = file
        return file.id

    # -- answers -------------------------------------------------------------------------------------

    def _respond(self, provider: str, body: dict, answer_id: str) -> tuple[int, dict]:
        """(status, body) of one request, as the online endpoint answers it (without rate limits)."""
        parsed = self.server._validate(provider, body)
        if isinstance(parsed, str):
            return 400, error_body(provider, 400, parsed)
        answer = self.server._build(provider, body, parsed, answer_id)
        if isinstance(answer, str):
            return 500, error_body(provider, 500, answer)
        return 200, answer

    @staticmethod
    def _injected(provider: str, fault: str) -> tuple[int, dict]:
        status, message = ITEM_FAULTS.get(fault, (500, f"fake server: unknown batch fault kind {fault!r}"))
        return status, error_body(provider, status, message)

    def _openai_item(self, custom_id: str, body: dict, fault: str | None) -> tuple[str, dict, Counter]:
        """(outcome, output/error-file line, tokens) of one item."""
        line: dict[str, Any] = {"id": "batch_req_" + _hex(), "custom_id": custom_id, "response": None, "error": None}
        if fault in ITEM_ENDINGS:
            code, message = ITEM_ENDINGS[fault]
            line["error"] = {"code": code, "message": message}
            return fault, line, Counter()
        status, answer = (self._injected("openai", fault) if fault else
                          self._respond("openai", body, "chatcmpl-" + _hex()))
        line["response"] = {"status_code": status, "request_id": "req_" + _hex(), "body": answer}
        if status != 200:
            return "errored", line, Counter()
        return "succeeded", line, Counter(input=answer["usage"]["prompt_tokens"],
                                          output=answer["usage"]["completion_tokens"])

    def _anthropic_item(self, custom_id: str, body: dict, fault: str | None) -> tuple[str, dict, Counter]:
        """(outcome, results line, tokens) of one item."""
        if fault in ITEM_ENDINGS:
            return fault, {"custom_id": custom_id, "result": {"type": fault}}, Counter()
        status, answer = (self._injected("anthropic", fault) if fault else
                          self._respond("anthropic", body, "msg_" + _hex()))
        result = {"type": "succeeded", "message": answer} if status == 200 else {"type": "errored", "error": answer}
        return ("succeeded" if status == 200 else "errored"), {"custom_id": custom_id, "result": result}, Counter()

    # -- OpenAI files ----------------------------------------------------------------------------------

    def _upload(self, _: str, query: dict, headers: dict, raw: bytes) -> Reply:
        content_type = headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise BatchError(400, "files: a multipart/form-data body is required")
        form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"content-type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
        fields = {part.get_param("name", header="content-disposition"):
                  (part.get_filename(), part.get_payload(decode=True) or b"") for part in form.iter_parts()}
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise BatchError(400, f"purpose: the fake accepts only 'batch', got {purpose!r}")
        if "file" not in fields:
            raise BatchError(400, "file: a file part is required")
        filename, data = fields["file"]
        filename = filename or "upload.jsonl"
        requests = self._batch_requests(filename, data)
        file = _File("file-" + _hex(), filename, purpose, data, int(time.time()), requests)
        self.files[file.id] = file
        with self.server.stats.lock:
            self.server.stats.files_uploaded += 1
        return json_reply(file.info())

    @staticmethod
    def _batch_requests(filename: str, data: bytes) -> list[tuple[str, dict]]:
        """The (custom_id, body) pairs of a batch input file; a BatchError names the first bad line."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BatchError(400, f"Invalid file '{filename}': not UTF-8") from None
        requests, seen = [], set()
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            custom_id = record.get("custom_id") if isinstance(record, dict) else None
            problem = ("not a JSON object" if not isinstance(record, dict) else
                       "custom_id: a non-empty string is required" if not isinstance(custom_id, str) or not custom_id
                       else f"duplicate custom_id '{custom_id}'" if custom_id in seen else
                       "method: must be 'POST'" if record.get("method") != "POST" else
                       f"url: must be '{CHAT_ENDPOINT}'" if record.get("url") != CHAT_ENDPOINT else
                       "body: a JSON object is required" if not isinstance(record.get("body"), dict) else None)
            if problem:
                raise BatchError(400, f"Invalid file '{filename}', line {number}: {problem}")
            seen.add(custom_id)
            requests.append((custom_id, record["body"]))
        if not requests:
            raise BatchError(400, f"Invalid file '{filename}': no requests")
        return requests

    def _file(self, file_id: str) -> _File:
        file = self.files.get(file_id)
        if file is None:
            raise BatchError(404, f"No such File object: {file_id}")
        return file

    def _file_info(self, file_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        return json_reply(self._file(file_id).info())

    def _file_delete(self, file_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        del self.files[self._file(file_id).id]
        return json_reply({"id": file_id, "object": "file", "deleted": True})

    def _file_content(self, file_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        return http_reply(200, self._file(file_id).data, content_type="application/octet-stream")

    # -- OpenAI batches ------------------------------------------------------------------------------

    def _openai_create(self, _: str, query: dict, headers: dict, raw: bytes) -> Reply:
        body = self._json(raw)
        file = self.files.get(body.get("input_file_id"))
        if file is None or file.purpose != "batch":
            raise BatchError(400 if file else 404, f"input_file_id: no batch input file {body.get('input_file_id')!r}")
        if body.get("endpoint") != CHAT_ENDPOINT:
            raise BatchError(400, f"endpoint: the fake serves only '{CHAT_ENDPOINT}'")
        if body.get("completion_window") != "24h":
            raise BatchError(400, "completion_window: must be '24h'")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise BatchError(400, "metadata: an object is required")
        batch = self._new_batch("openai", "batch_", file.requests, input_file_id=file.id, metadata=metadata)
        return self._lost("openai") or json_reply(self._openai_view(batch, "validating"))

    def _openai_retrieve(self, batch_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        return json_reply(self._openai_view(self._batch("openai", batch_id)))

    def _openai_list(self, _: str, query: dict, headers: dict, raw: bytes) -> Reply:
        return json_reply({"object": "list", **self._page("openai", query, "after", "before", 100)})

    def _openai_cancel(self, batch_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        batch = self._batch("openai", batch_id)
        status = self._openai_view(batch)["status"]
        if status != "in_progress":
            raise BatchError(400, f"Cannot cancel a batch with status '{status}'.")
        batch.processed_before_cancel, batch.cancelled_at = len(batch.lines), time.time()
        return json_reply(self._openai_view(batch, "cancelling"))

    def _openai_view(self, batch: _Batch, status: str | None = None) -> dict[str, Any]:
        """The Batch object; `status` forces the transient "validating" / "cancelling" of a reply."""
        progress = batch.progress()
        if status != "validating":
            self._advance(batch, batch.due(FINALIZE_AT))
        if status is None and (batch.cancelled_at is not None or progress >= 1):
            self._finish(batch)
        total = len(batch.items)
        if status is None:
            status = ("cancelled" if batch.cancelled_at is not None else
                      "in_progress" if progress < FINALIZE_AT else "finalizing" if progress < 1 else
                      "expired" if batch.outcomes["expired"] == total else "completed")
        completed = batch.outcomes["succeeded"]
        failed = sum(batch.outcomes.values()) - completed
        ended = status in ("completed", "expired", "cancelled")
        usage = {"input_tokens": batch.tokens["input"], "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": batch.tokens["output"], "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": batch.tokens["input"] + batch.tokens["output"]}
        created = int(batch.created_at)
        model = next((body.get("model") for _, body, _ in batch.items if body.get("model")), None)
        return {
            "id": batch.id, "object": "batch", "endpoint": CHAT_ENDPOINT, "model": model, "errors": None,
            "input_file_id": batch.input_file_id, "completion_window": "24h", "status": status,
            "output_file_id": batch.output_file_id if ended else None,
            "error_file_id": batch.error_file_id if ended else None,
            "created_at": created, "in_progress_at": None if status == "validating" else created,
            "expires_at": created + DAY_S,
            "finalizing_at": (int(batch.created_at + FINALIZE_AT * batch.delay_s)
                              if status in ("finalizing", "completed", "expired") else None),
            "completed_at": int(batch.ended_at) if status == "completed" else None,
            "failed_at": None,
            "expired_at": int(batch.ended_at) if status == "expired" else None,
            "cancelling_at": int(batch.cancelled_at) if batch.cancelled_at is not None else None,
            "cancelled_at": int(batch.ended_at) if status == "cancelled" else None,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "metadata": batch.metadata, "usage": usage if ended else None,
        }

    # -- Anthropic message batches -------------------------------------------------------------------

    def _anthropic_create(self, _: str, query: dict, headers: dict, raw: bytes) -> Reply:
        requests = self._json(raw).get("requests")
        if not isinstance(requests, list) or not requests:
            raise BatchError(400, "requests: a non-empty list is required")
        pairs, seen = [], set()
        for index, request in enumerate(requests):
            custom_id = request.get("custom_id") if isinstance(request, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
                raise BatchError(400, f"requests.{index}.custom_id: {custom_id!r} does not match "
                                      f"{CUSTOM_ID.pattern}")
            if custom_id in seen:
                raise BatchError(400, f"requests.{index}.custom_id: duplicate custom_id '{custom_id}'")
            if not isinstance(request.get("params"), dict):
                raise BatchError(400, f"requests.{index}.params: an object is required")
            seen.add(custom_id)
            pairs.append((custom_id, request["params"]))
        batch = self._new_batch("anthropic", "msgbatch_", pairs)
        return self._lost("anthropic") or json_reply(self._anthropic_view(batch, "in_progress"))

    def _anthropic_retrieve(self, batch_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        return json_reply(self._anthropic_view(self._batch("anthropic", batch_id)))

    def _anthropic_list(self, _: str, query: dict, headers: dict, raw: bytes) -> Reply:
        return json_reply(self._page("anthropic", query, "after_id", "before_id", 1000))

    def _anthropic_cancel(self, batch_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        batch = self._batch("anthropic", batch_id)
        status = self._anthropic_view(batch)["processing_status"]
        if status != "in_progress":
            raise BatchError(400, f"Cannot cancel a message batch with processing_status '{status}'.")
        batch.processed_before_cancel, batch.cancelled_at = len(batch.lines), time.time()
        return json_reply(self._anthropic_view(batch, "canceling"))

    def _anthropic_results(self, batch_id: str, query: dict, headers: dict, raw: bytes) -> Reply:
        batch = self._batch("anthropic", batch_id)
        if self._anthropic_view(batch)["processing_status"] != "ended":
            raise BatchError(400, f"Results for message batch {batch_id} are not available until processing ends.")
        return http_reply(200, batch.results, content_type="application/binary")

    def _anthropic_view(self, batch: _Batch, status: str | None = None) -> dict[str, Any]:
        """The MessageBatch object; `status` forces the "in_progress" / "canceling" of a create / cancel reply."""
        if status is None:
            self._advance(batch, batch.due(1.0))
            if batch.cancelled_at is not None or batch.progress() >= 1:
                self._finish(batch)
        counts = {"processing": len(batch.items) - sum(batch.outcomes.values()),
                  **{key: batch.outcomes[key] for key in ("succeeded", "errored", "canceled", "expired")}}
        ended = batch.ended_at is not None
        return {
            "id": batch.id, "type": "message_batch",
            "processing_status": status or ("ended" if ended else "in_progress"),
            "request_counts": counts, "created_at": _rfc3339(batch.created_at),
            "expires_at": _rfc3339(batch.created_at + DAY_S),
            "ended_at": _rfc3339(batch.ended_at) if ended else None,
            "cancel_initiated_at": _rfc3339(batch.cancelled_at) if batch.cancelled_at is not None else None,
            "archived_at": None,
            "results_url": f"{self.server.url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }
