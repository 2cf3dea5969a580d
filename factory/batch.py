"""`teacher.mode: batch`: the OpenAI Batch API and Anthropic Message Batches, at the batch price.

The same prompts, request bodies, cache, store and checks as an online run; only the way requests reach
the provider differs:

1. walk every work item; records already on disk are skipped, answers already in the cache become
   records at once, the rest wait for a batch;
2. batches already at the provider (an earlier run's, from the ledger) are collected, never sent again;
3. the remaining requests are cut into batches within the provider's limits (requests and bytes), each
   written to `batches/NAME.jsonl` and submitted;
4. poll with a growing interval; an ended batch's results (in any order, matched by `custom_id`, which
   is the request's cache key) go into the cache first, then become records through the checks;
5. failed or expired requests are sent again in a new batch, up to `batch.resend` rounds; what still
   fails, or fails for good (HTTP 400), goes to failed.jsonl and the next run retries it.

The ledger `batches.jsonl` is append-only, one whole line an event (prepared, uploaded, submitted,
fetched), written before the step it announces completes is relied on. After a crash, a batch whose
submission was announced but whose id was never written is found at the provider (OpenAI: by the run
token in its metadata; Anthropic, which has no metadata: by its request count and creation time) instead
of being sent again. Killed at any point, the same command finishes the run with nothing resubmitted
that the provider had accepted and nothing lost.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from .asker import BudgetExhausted
from .cache import cache_key
from .prompts import iter_prompts
from .store import repair_tail
from .teachers import TeacherError
from .teachers.hosted import RETRYABLE_STATUS, map_sdk_error

if TYPE_CHECKING:
    from .pipeline import Run, WorkItem

LEDGER = "batches.jsonl"
BATCH_DIR = "batches"
OPENAI_RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


class _Stopped(Exception):
    """The run is stopping (fatal error, Ctrl-C): leave the batches where they are."""


@dataclass(slots=True)
class Waiting:
    """A request that needs an answer from a batch."""

    item: "WorkItem"
    key: str                       # cache key; the custom_id at the provider
    worst_usd: float
    attempts: int = 0


@dataclass
class Batch:
    name: str
    round: int
    count: int
    worst_usd: float
    prepared_at: float
    file_id: str | None = None
    provider_id: str | None = None
    fetched: bool = False
    abandoned: bool = False
    answered: int = 0          # the provider's count of finished requests, for the progress line
    status: str = "prepared"
    info: Any = None           # the provider's last word on it (OpenAI: the Batch object)

    @property
    def open(self) -> bool:
        return not (self.fetched or self.abandoned)


class Ledger:
    """`batches.jsonl`: what was prepared, uploaded, submitted and fetched, folded into Batch objects."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER
        self.dir = run_dir / BATCH_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self.batches: dict[str, Batch] = {}
        self.token: str | None = None
        self.failures: dict[str, int] = {}  # custom_id → failed attempts since the last `run` event
        if self.path.exists():
            with self.path.open("r", encoding="utf-8") as handle:
                for line in handle:
                    self._fold(json.loads(line))
        self._file = open(self.path, "ab", buffering=0)
        if self.token is None:
            self.append({"event": "ledger", "token": secrets.token_hex(8)})
        self.append({"event": "run", "at": time.time()})

    def _fold(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "ledger":
            self.token = event["token"]
        elif kind == "run":
            self.failures = {}
        elif kind == "prepared":
            self.batches[event["batch"]] = Batch(event["batch"], event["round"], event["count"],
                                                 event["worst_usd"], event["at"])
        else:
            batch = self.batches[event["batch"]]
            if kind == "uploaded":
                batch.file_id = event["file_id"]
            elif kind == "submitted":
                batch.provider_id = event["provider_id"]
                batch.status = "submitted"
            elif kind == "fetched":
                batch.fetched = True
                batch.status = event.get("status", "fetched")
                for key in event.get("failed", ()):
                    self.failures[key] = self.failures.get(key, 0) + 1
            elif kind == "abandoned":
                batch.abandoned = True
                batch.status = "abandoned"

    def append(self, event: dict[str, Any]) -> None:
        self._fold(event)
        self._file.write((json.dumps(event, separators=(",", ":")) + "\n").encode("utf-8"))

    def input_path(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def keys(self, name: str) -> list[str]:
        keys = []
        with self.input_path(name).open("r", encoding="utf-8") as handle:
            for line in handle:
                keys.append(json.loads(line)["custom_id"])
        return keys

    def next_name(self) -> str:
        return f"b{len(self.batches) + 1:05d}"

    def close(self) -> None:
        self._file.close()


@dataclass
class Outcome:
    """One result line: an answer (JSON of the provider's response), or a failure."""

    key: str
    data: dict[str, Any] | None = None
    error: str | None = None
    status: int | None = None
    retryable: bool = True


class BatchDriver:
    def __init__(self, run: "Run", prompts_path: Path) -> None:
        self.run = run
        self.prompts_path = prompts_path
        self.config = run.config
        self.teacher = run.asker.teacher
        self.cache = run.asker.cache
        self.pricer = run.asker.pricer
        self.budget = run.asker.budget
        self.provider = self.config.teacher.provider
        self.options = self.config.teacher.batch
        self.max_requests, self.max_bytes = self.options.limits(self.provider)
        self.waiting: dict[str, Waiting] = {}   # key → request of this run without an answer yet
        self.in_batch: dict[str, str] = {}      # key → name of the open batch that carries it
        self.next_poll_at = 0.0
        self.ledger: Ledger | None = None

    # ---- the progress line and the manifest -------------------------------------------------------
    def note(self) -> str:
        if self.ledger is None:
            return ""
        open_batches = [b for b in self.ledger.batches.values() if b.open and b.provider_id]
        fetched = sum(1 for b in self.ledger.batches.values() if b.fetched)
        answered = sum(b.answered for b in open_batches)
        total = sum(b.count for b in open_batches)
        wait = max(0.0, self.next_poll_at - time.monotonic())
        return (f"batches: {len(open_batches)} at the provider ({answered:,}/{total:,} answered), "
                f"{fetched} fetched · next poll {wait:.0f} s")

    def summary(self) -> dict[str, Any]:
        batches = list(self.ledger.batches.values()) if self.ledger else []
        return {
            "open": [{"name": b.name, "id": b.provider_id, "requests": b.count, "status": b.status}
                     for b in batches if b.open],
            "fetched": sum(1 for b in batches if b.fetched),
            "abandoned": sum(1 for b in batches if b.abandoned),
            "submitted": sum(1 for b in batches if b.provider_id),
        }

    # ---- the run ------------------------------------------------------------------------------------
    async def execute(self) -> None:
        self.ledger = Ledger(self.config.output_dir)
        self.run.batches = self
        try:
            await self._walk()
            await self._resume_open()
            await self._submit([w for key, w in self.waiting.items() if key not in self.in_batch], 0)
            await self._poll()
        except _Stopped:
            pass
        finally:
            self.ledger.close()

    async def _walk(self) -> None:
        run, config = self.run, self.config
        context_chars = sum(len(m["content"]) for m in config.teacher.context or ())
        sent = 0
        for prompt in iter_prompts(self.prompts_path, config.prompts.system):
            if run.stopping or (run.limit is not None and sent >= run.limit):
                break
            sent += 1
            chars = sum(len(m["content"]) for m in prompt.messages) + context_chars
            for item in run._open_items(self.teacher, prompt):
                key = cache_key(item.body_json, item.indices[0])
                if key in self.cache:
                    await run._process(item)  # answered before: straight to the checks and the store
                    continue
                worst = self.pricer.cost(run.limiter.estimate_tokens(chars),
                                         config.teacher.max_tokens * len(item.indices))
                self.waiting[key] = Waiting(item, key, worst, self.ledger.failures.get(key, 0))

    async def _resume_open(self) -> None:
        """Batches of an earlier run that were not fetched: find them at the provider, never resend them."""
        # Already at the provider: reserved as they are, whatever the budget says now.
        self.budget.reserved += sum(b.worst_usd for b in self.ledger.batches.values() if b.open)
        for batch in list(self.ledger.batches.values()):
            if not batch.open:
                continue
            for key in self.ledger.keys(batch.name):
                if key in self.waiting:
                    self.in_batch[key] = batch.name
            if batch.provider_id is None:
                found = await self._find_submitted(batch)
                if found is not None:
                    self.run.console.print(f"batch {batch.name}: found at the provider as {found} "
                                           "(submitted before the crash); not sent again")
                    self.ledger.append({"event": "submitted", "batch": batch.name, "provider_id": found,
                                        "adopted": True})
                else:
                    await self._send(batch)

    # ---- submit ---------------------------------------------------------------------------------------
    async def _submit(self, items: list[Waiting], round_: int) -> None:
        """Cut `items` into batches within the limits; write, announce and send each."""
        chunk: list[str] = []
        size = 0
        worst = 0.0
        for waiting in items:
            line = self._line(waiting)
            if chunk and (len(chunk) >= self.max_requests or size + len(line) > self.max_bytes):
                await self._prepare_and_send(chunk, worst, round_)
                chunk, size, worst = [], 0, 0.0
            chunk.append(line)
            size += len(line)
            worst += waiting.worst_usd
        if chunk:
            await self._prepare_and_send(chunk, worst, round_)

    def _line(self, waiting: Waiting) -> str:
        if self.provider == "openai":
            entry = {"custom_id": waiting.key, "method": "POST", "url": "/v1/chat/completions",
                     "body": waiting.item.body}
        else:
            entry = {"custom_id": waiting.key, "params": waiting.item.body}
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"

    async def _prepare_and_send(self, lines: list[str], worst: float, round_: int) -> None:
        run = self.run
        try:
            self.budget.reserve(worst)  # the batch's worst case, released when its answers are in
        except BudgetExhausted:
            run.budget_hit = True
            run._stop()
            raise _Stopped from None
        name = self.ledger.next_name()
        path = self.ledger.input_path(name)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            handle.writelines(lines)
        os.replace(tmp, path)
        self.ledger.append({"event": "prepared", "batch": name, "round": round_, "count": len(lines),
                            "worst_usd": round(worst, 6), "at": time.time()})
        for line in lines:
            self.in_batch[json.loads(line)["custom_id"]] = name
        await self._send(self.ledger.batches[name])

    async def _send(self, batch: Batch) -> None:
        path = self.ledger.input_path(batch.name)
        client = self.teacher.client
        try:
            if self.provider == "openai":
                if batch.file_id is None:
                    data = path.read_bytes()
                    uploaded = await self._call(lambda: client.files.create(file=(path.name, data), purpose="batch"))
                    self.ledger.append({"event": "uploaded", "batch": batch.name, "file_id": uploaded.id})
                created = await self._call(lambda: client.batches.create(
                    input_file_id=batch.file_id, endpoint="/v1/chat/completions", completion_window="24h",
                    metadata={"apprentice": f"{self.ledger.token}:{batch.name}"}))
            else:
                requests = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
                created = await self._call(lambda: client.messages.batches.create(requests=requests))
        except TeacherError as error:  # the provider refused the batch itself: its requests fail
            self.ledger.append({"event": "abandoned", "batch": batch.name, "error": str(error)})
            self.budget.release(batch.worst_usd)
            for key in self.ledger.keys(batch.name):
                if self.in_batch.get(key) == batch.name:
                    del self.in_batch[key]
                    self._fail(self.waiting.pop(key), f"batch {batch.name} refused: {error}", error.status)
            return
        self.ledger.append({"event": "submitted", "batch": batch.name, "provider_id": created.id})
        self.run.console.print(f"batch {batch.name}: {batch.count:,} requests submitted as {created.id}",
                               highlight=False)

    async def _find_submitted(self, batch: Batch) -> str | None:
        """The provider's id of a batch whose submission was announced but never confirmed, if it exists."""
        client = self.teacher.client
        since = batch.prepared_at - 120.0  # clock skew between here and the provider
        if self.provider == "openai":
            tag = f"{self.ledger.token}:{batch.name}"
            page = await self._call(lambda: client.batches.list(limit=100))
            async for found in page:
                if (found.metadata or {}).get("apprentice") == tag:
                    return found.id
                if found.created_at < since:
                    break
            return None
        candidates = []
        page = await self._call(lambda: client.messages.batches.list(limit=100))
        async for found in page:
            created = _epoch(found.created_at)
            if created < since:
                break
            counts = found.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == batch.count:
                candidates.append(found.id)
        if len(candidates) > 1:
            self.run.console.print(
                f"[yellow]batch {batch.name}: {len(candidates)} batches at Anthropic could be the one submitted "
                f"before the crash ({', '.join(candidates)}); sending it again. Cancel the extra one if it "
                "was ours.[/]")
            return None
        return candidates[0] if candidates else None

    # ---- poll and fetch -------------------------------------------------------------------------------
    async def _poll(self) -> None:
        interval = self.options.poll_s
        while not self.run.stopping:
            open_batches = [b for b in self.ledger.batches.values() if b.open and b.provider_id]
            if not open_batches:
                return
            changed = False
            resend: list[Waiting] = []
            for batch in open_batches:
                ended, answered = await self._status(batch)
                if answered != batch.answered:
                    batch.answered, changed = answered, True
                if ended:
                    resend += await self._fetch(batch)
                    changed = True
            if resend:
                await self._submit(resend, max(w.attempts for w in resend))
            interval = self.options.poll_s if changed else min(interval * 1.5, self.options.poll_max_s)
            if any(b.open and b.provider_id for b in self.ledger.batches.values()):
                await self._sleep(interval)

    async def _status(self, batch: Batch) -> tuple[bool, int]:
        client = self.teacher.client
        if self.provider == "openai":
            info = await self._call(lambda: client.batches.retrieve(batch.provider_id))
            batch.status = info.status
            counts = info.request_counts
            answered = (counts.completed + counts.failed) if counts else 0
            batch.info = info
            return info.status not in OPENAI_RUNNING, answered
        info = await self._call(lambda: client.messages.batches.retrieve(batch.provider_id))
        batch.status = info.processing_status
        counts = info.request_counts
        answered = counts.succeeded + counts.errored + counts.canceled + counts.expired
        return info.processing_status == "ended", answered

    async def _fetch(self, batch: Batch) -> list[Waiting]:
        """Store an ended batch's answers (cache first, then records); return the requests to send again."""
        resend: list[Waiting] = []
        failed: dict[str, str] = {}
        succeeded = 0
        counters, cache, pricer = self.run.counters, self.cache, self.pricer
        async for outcome in self._outcomes(batch):  # streamed: memory does not grow with the batch
            mine = self.in_batch.get(outcome.key) == batch.name
            waiting = self.waiting.pop(outcome.key) if mine else None
            if outcome.data is not None:
                fresh = outcome.key not in cache  # a batch fetched again after a crash: stored already
                if fresh:
                    try:
                        response = self.teacher.parse(outcome.data)
                    except TeacherError as error:
                        outcome.error = str(error)
                    else:
                        # Paid for: into the cache even when no record of this run needs it (--limit).
                        cost = pricer.cost(response.input_tokens, response.output_tokens)
                        cache.put(outcome.key, response.to_cache(), cost)
                        counters.requests += 1
                        counters.input_tokens += response.input_tokens
                        counters.output_tokens += response.output_tokens
                        counters.cost_usd += cost
                if outcome.error is None:
                    succeeded += 1
                    if waiting is not None:
                        del self.in_batch[outcome.key]
                        await self.run._process(waiting.item)  # from the cache: checks, store
                        if fresh:
                            counters.cache_hits -= 1  # answered by this batch, not found in the cache
                    continue
            failed[outcome.key] = outcome.error or "failed"
            if waiting is None:
                continue
            del self.in_batch[outcome.key]
            waiting.attempts += 1
            if outcome.retryable and waiting.attempts <= self.options.resend:
                self.waiting[outcome.key] = waiting
                resend.append(waiting)
            else:
                why = "" if outcome.retryable else " (not retryable)"
                self._fail(waiting, f"batch {batch.name}: {outcome.error}{why}", outcome.status)
        self.ledger.append({"event": "fetched", "batch": batch.name, "status": batch.status,
                            "succeeded": succeeded, "failed": failed})
        self.budget.release(batch.worst_usd)
        self.run.console.print(
            f"batch {batch.name} ({batch.provider_id}) {batch.status}: {succeeded:,} answered, {len(failed):,} failed"
            + (f", {len(resend):,} sent again" if resend else ""), highlight=False)
        return resend

    async def _outcomes(self, batch: Batch) -> AsyncIterator[Outcome]:
        """Every request of an ended batch once: its result, or why it has none."""
        seen: set[str] = set()
        results = self._openai_outcomes(batch) if self.provider == "openai" else self._anthropic_outcomes(batch)
        async for outcome in results:
            if outcome.key not in seen:
                seen.add(outcome.key)
                yield outcome
        why = f"no result in batch {batch.name} ({batch.status})"
        if self.provider == "openai" and batch.status == "failed" and not seen:
            info = batch.info
            errors = "; ".join(f"{e.code}: {e.message}" for e in (info.errors.data if info.errors else []) or [])
            why = f"batch failed validation: {errors or 'no reason given'}"
        for key in self.ledger.keys(batch.name):  # requests the provider did not account for
            if key not in seen:
                yield Outcome(key, error=why, retryable=not why.startswith("batch failed validation"))

    async def _openai_outcomes(self, batch: Batch) -> AsyncIterator[Outcome]:
        """The output file, then the error file, each downloaded to batches/ first (streamed to disk, then
        read a line at a time; a crash while reading costs no second download)."""
        for kind, file_id in (("output", batch.info.output_file_id), ("errors", batch.info.error_file_id)):
            if not file_id:
                continue
            path = self.ledger.dir / f"{batch.name}.{kind}.jsonl"
            if not path.exists():
                await self._call(lambda: self._download(file_id, path))
            with path.open("r", encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield _openai_outcome(json.loads(line))

    async def _download(self, file_id: str, path: Path) -> None:
        part = path.with_suffix(".part")
        async with self.teacher.client.files.with_streaming_response.content(file_id) as response:
            with part.open("wb") as handle:
                async for chunk in response.iter_bytes():
                    handle.write(chunk)
        os.replace(part, path)

    async def _anthropic_outcomes(self, batch: Batch) -> AsyncIterator[Outcome]:
        client = self.teacher.client
        results = await self._call(lambda: client.messages.batches.results(batch.provider_id))
        async for entry in results:
            result = entry.result
            if result.type == "succeeded":
                yield Outcome(entry.custom_id, data=result.message.model_dump(mode="json"))
            elif result.type == "errored":
                error = result.error.error
                yield Outcome(entry.custom_id, error=f"{error.type}: {error.message}",
                              retryable=error.type != "invalid_request_error")
            else:  # expired, canceled
                yield Outcome(entry.custom_id, error=result.type)

    # ---- helpers ----------------------------------------------------------------------------------------
    def _fail(self, waiting: Waiting, message: str, status: int | None) -> None:
        from .pipeline import FATAL_STATUS

        # One request's failure inside a batch never stops the run, whatever its status.
        error = TeacherError(message, retryable=False, status=None if status in FATAL_STATUS else status)
        error.attempts = max(1, waiting.attempts)  # type: ignore[attr-defined]
        self.run._fail_item(waiting.item, error)

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """One call to the batch endpoints, retried with backoff like an online request."""
        from .pipeline import FATAL_STATUS

        sdk = self.teacher._sdk
        attempt = 0
        while True:
            if self.run.stopping:
                raise _Stopped
            try:
                return await make()
            except sdk.APIError as exc:  # openai.APIError / anthropic.APIError
                error = map_sdk_error(exc, sdk)
            if error.status in FATAL_STATUS:
                self.run.fatal = f"{FATAL_STATUS[error.status]} ({error})"
                self.run._stop()
                raise _Stopped
            attempt += 1
            if not error.retryable or attempt > self.config.teacher.max_retries:
                raise error
            await self._sleep(error.retry_after if error.retry_after is not None else min(60.0, 2.0 ** attempt))

    async def _sleep(self, seconds: float) -> None:
        self.next_poll_at = time.monotonic() + seconds
        while not self.run.stopping and time.monotonic() < self.next_poll_at:
            await asyncio.sleep(min(0.2, max(0.0, self.next_poll_at - time.monotonic())))


def _openai_outcome(entry: dict[str, Any]) -> Outcome:
    key = entry.get("custom_id", "")
    response = entry.get("response") or None
    if response is not None and response.get("status_code") == 200:
        return Outcome(key, data=response.get("body") or {})
    if response is not None:
        status = response.get("status_code")
        message = ((response.get("body") or {}).get("error") or {}).get("message") or "no message"
        return Outcome(key, error=f"HTTP {status}: {message}", status=status, retryable=status in RETRYABLE_STATUS)
    error = entry.get("error") or {}
    return Outcome(key, error=f"{error.get('code') or 'error'}: {error.get('message') or 'no message'}")


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
