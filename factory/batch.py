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
candidates, not_ours, fetched, abandoned), written before the step it announces completes is relied on.
A batch the provider may hold without our knowing its id (the create's answer was lost to a timeout, a
dropped connection or a 5xx; or the process died before the ledger recorded the id) is looked up before
it is sent again. OpenAI: by the run's tag in the batch's metadata, certain. Anthropic keeps no metadata
and shows neither requests nor results before a batch ends, so the batches created since then with the
same request count (and not already in the ledger) become candidates; each is confirmed or dismissed once
it has ended, by whether its first result's custom_id (a cache key of this batch) is ours, and only when
none was ours is the batch sent again. Killed at any point, the same command finishes the run with
nothing resubmitted that the provider had accepted and nothing lost.

What differs between providers (the line format, submitting, finding, polling, reading results) is in
the teachers' batch hooks (factory/teachers/batching.py); this driver has no provider branches, and it
reaches the run only through the decider's public methods and the run's Stop.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from rich.console import Console
from rich.markup import escape

from apprentice.errors import FATAL_STATUS, ApprenticeError, TeacherError

from .asker import BudgetExhausted
from .batch_ledger import Batch, Ledger
from .cache import cache_key
from .decide import Decider, Stop, WorkItem
from .limiter import Limiter
from .prompts import iter_prompts
from .teachers.batching import BatchTeacher, Outcome
from .teachers.hosted import map_sdk_error

CLOCK_SKEW_S = 120.0  # between this machine's clock and the provider's, when matching creation times


class _Stopped(ApprenticeError):
    """The run is stopping (fatal error, Ctrl-C): leave the batches where they are."""


class _Adopted(ApprenticeError):
    """A create whose answer was lost was found at the provider (the ledger says so): do not send it again."""


@dataclass(slots=True)
class Waiting:
    """A request that needs an answer from a batch."""

    item: WorkItem
    key: str                       # cache key; the custom_id at the provider
    worst_usd: float
    attempts: int = 0


class BatchDriver:
    def __init__(self, decider: Decider, prompts_path: Path, *, limit: int | None, limiter: Limiter, stop: Stop,
                 console: Console) -> None:
        self.decider = decider
        self.prompts_path = prompts_path
        self.limit = limit
        self.limiter = limiter
        self.stop = stop
        self.console = console
        self.config = decider.config
        self.teacher: BatchTeacher = decider.asker.teacher  # type: ignore[assignment]
        self.cache = decider.asker.cache
        self.pricer = decider.asker.pricer
        self.budget = decider.asker.budget
        self.options = self.config.teacher.batch
        self.max_requests, self.max_bytes = self.options.limits(self.config.teacher.provider)
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
            "open": [{"name": b.name, "id": b.provider_id, "requests": b.count, "status": b.status,
                      **({"candidates": b.candidates} if b.candidates else {})} for b in batches if b.open],
            "fetched": sum(1 for b in batches if b.fetched),
            "abandoned": sum(1 for b in batches if b.abandoned),
            "submitted": sum(1 for b in batches if b.provider_id),
        }

    # ---- the run ------------------------------------------------------------------------------------
    async def execute(self) -> None:
        self.ledger = Ledger(self.config.output_dir)
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
        config, decider = self.config, self.decider
        context_chars = sum(len(m["content"]) for m in config.teacher.context or ())
        sent = 0
        for prompt in iter_prompts(self.prompts_path, config.prompts.system):
            if self.stop.stopping or (self.limit is not None and sent >= self.limit):
                break
            sent += 1
            chars = sum(len(m["content"]) for m in prompt.messages) + context_chars
            for item in decider.open_items(prompt):
                key = cache_key(item.body_json, item.indices[0])
                if key in self.cache:
                    await decider.process(item)  # answered before: straight to the checks and the store
                    continue
                worst = self.pricer.worst(self.limiter.estimate_tokens(chars),
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
            # Submitted before the crash but never confirmed: look before sending again. Candidates found by
            # an earlier run wait in _poll for their results.
            if batch.provider_id is None and not batch.candidates:
                if not await self._find_submitted(batch, batch.prepared_at - CLOCK_SKEW_S, "before the crash"):
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
        entry = self.teacher.batch_entry(waiting.key, waiting.item.body)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"

    async def _prepare_and_send(self, lines: list[str], worst: float, round_: int) -> None:
        try:
            self.budget.reserve(worst)  # the batch's worst case, released when its answers are in
        except BudgetExhausted:
            self.stop(budget=True)
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
        sent_at = time.time()

        def uploaded(file_id: str) -> None:
            self.ledger.append({"event": "uploaded", "batch": batch.name, "file_id": file_id})

        async def lost() -> None:
            if await self._find_submitted(batch, sent_at - CLOCK_SKEW_S, "although its answer was lost"):
                raise _Adopted

        async def call(make: Callable[[], Awaitable[Any]], *, once: bool = False) -> Any:
            return await self._call(make, lost=lost if once else None)

        try:
            provider_id = await self.teacher.submit_batch(path, file_id=batch.file_id, tag=self._tag(batch),
                                                          call=call, uploaded=uploaded)
        except _Adopted:
            return
        except TeacherError as error:  # the provider refused the batch itself: its requests fail
            self.ledger.append({"event": "abandoned", "batch": batch.name, "error": str(error)})
            self.budget.release(batch.worst_usd)
            for key in self.ledger.keys(batch.name):
                if self.in_batch.get(key) == batch.name:
                    del self.in_batch[key]
                    self._fail(self.waiting.pop(key), f"batch {batch.name} refused: {error}", error.status)
            return
        self.ledger.append({"event": "submitted", "batch": batch.name, "provider_id": provider_id})
        self.console.print(escape(f"batch {batch.name}: {batch.count:,} requests submitted as {provider_id}"),
                           highlight=False)

    def _tag(self, batch: Batch) -> str:
        """What marks a batch at the provider as this run's: the ledger's token and the batch's name."""
        return f"{self.ledger.token}:{batch.name}"

    async def _find_submitted(self, batch: Batch, since: float, why: str) -> bool:
        """Whether the provider may hold `batch` (submitted, its id never seen); the ledger records what was
        found: the batch itself (a tag matched), or the candidates to confirm once they end."""
        known = self.ledger.known_ids()
        found = [found for found in await self.teacher.find_batch(tag=self._tag(batch), count=batch.count,
                                                                  since=since, call=self._call)
                 if found not in known]
        if not found:
            return False
        if self.teacher.batch_tagged:
            self.console.print(escape(f"batch {batch.name}: found at the provider as {found[0]} (submitted {why}); "
                                      "not sent again"), highlight=False)
            self.ledger.append({"event": "submitted", "batch": batch.name, "provider_id": found[0], "adopted": True})
        else:
            self.console.print(escape(
                f"batch {batch.name}: {', '.join(found)} at the provider may be it (submitted {why}; same request "
                "count, created since); not sent again: confirmed by its results once it ends"), highlight=False)
            self.ledger.append({"event": "candidates", "batch": batch.name, "ids": found})
        return True

    async def _confirm(self, batch: Batch) -> bool:
        """Poll the candidates of `batch`; an ended one is it if its first result is one of its requests, and
        is dismissed otherwise. When none is left, the batch never reached the provider: send it. Whether
        anything changed."""
        keys = set(self.ledger.keys(batch.name))
        changed = False
        for candidate in list(batch.candidates):
            state = await self.teacher.batch_status(candidate, self._call)
            if not state.ended:
                continue
            changed = True
            outcomes = self.teacher.batch_outcomes(state, candidate, self.ledger.dir, f"{batch.name}.{candidate}",
                                                   self._call)
            async with aclosing(outcomes):  # one result tells: no need to read a whole batch that is not ours
                first = await anext(outcomes, None)
            if first is not None and first.key in keys:
                self.console.print(escape(f"batch {batch.name}: {candidate} is it (its results are ours)"), highlight=False)
                self.ledger.append({"event": "submitted", "batch": batch.name, "provider_id": candidate,
                                    "adopted": True})
                return True
            self.ledger.append({"event": "not_ours", "batch": batch.name, "id": candidate})
        if not batch.candidates:
            self.console.print(f"batch {batch.name}: no batch at the provider was it; sending it", highlight=False)
            await self._send(batch)
        return changed

    # ---- poll and fetch -------------------------------------------------------------------------------
    async def _poll(self) -> None:
        interval = self.options.poll_s
        while not self.stop.stopping:
            open_batches = [b for b in self.ledger.batches.values() if b.open and (b.provider_id or b.candidates)]
            if not open_batches:
                return
            changed = False
            resend: list[Waiting] = []
            for batch in open_batches:
                if batch.provider_id is None:
                    changed = await self._confirm(batch) or changed
                    if batch.provider_id is None:
                        continue
                ended, answered = await self._status(batch)
                if answered != batch.answered:
                    batch.answered, changed = answered, True
                if ended:
                    resend += await self._fetch(batch)
                    changed = True
            if resend:
                await self._submit(resend, max(w.attempts for w in resend))
            interval = self.options.poll_s if changed else min(interval * 1.5, self.options.poll_max_s)
            if any(b.open and (b.provider_id or b.candidates) for b in self.ledger.batches.values()):
                await self._sleep(interval)

    async def _status(self, batch: Batch) -> tuple[bool, int]:
        state = batch.state = await self.teacher.batch_status(batch.provider_id, self._call)
        batch.status = state.status
        return state.ended, state.answered

    async def _fetch(self, batch: Batch) -> list[Waiting]:
        """Store an ended batch's answers (cache first, then records); return the requests to send again."""
        resend: list[Waiting] = []
        failed: dict[str, str] = {}
        succeeded = 0
        counters, cache, pricer = self.decider.counters, self.cache, self.pricer
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
                        cost = pricer.cost_of(response)
                        cache.put(outcome.key, response.to_cache(), cost)
                        counters.count(response, cost)
                if outcome.error is None:
                    succeeded += 1
                    if waiting is not None:
                        del self.in_batch[outcome.key]
                        await self.decider.process(waiting.item)  # from the cache: checks, store
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
        self.console.print(escape(
            f"batch {batch.name} ({batch.provider_id}) {batch.status}: {succeeded:,} answered, {len(failed):,} failed"
            + (f", {len(resend):,} sent again" if resend else "")), highlight=False)
        return resend

    async def _outcomes(self, batch: Batch) -> AsyncIterator[Outcome]:
        """Every request of an ended batch once: its result, or why it has none."""
        seen: set[str] = set()
        assert batch.state is not None and batch.provider_id is not None
        async for outcome in self.teacher.batch_outcomes(batch.state, batch.provider_id, self.ledger.dir,
                                                         batch.name, self._call):
            if outcome.key not in seen:
                seen.add(outcome.key)
                yield outcome
        refused = None if seen else self.teacher.batch_failure(batch.state)
        why = refused or f"no result in batch {batch.name} ({batch.status})"
        for key in self.ledger.keys(batch.name):  # requests the provider did not account for
            if key not in seen:
                yield Outcome(key, error=why, retryable=refused is None)

    # ---- helpers ----------------------------------------------------------------------------------------
    def _fail(self, waiting: Waiting, message: str, status: int | None) -> None:
        # One request's failure inside a batch never stops the run, whatever its status.
        error = TeacherError(message, retryable=False, status=None if status in FATAL_STATUS else status,
                             attempts=max(1, waiting.attempts))
        self.decider.fail_item(waiting.item, error)

    async def _call(self, make: Callable[[], Awaitable[Any]], *,
                    lost: Callable[[], Awaitable[None]] | None = None) -> Any:
        """One call to the batch endpoints, retried with backoff like an online request. `lost`, for a call
        that must not take effect twice (a create): after a failure that the provider may have acted on, it
        looks for the effect before the call is made again, and raises to end the call when it is there."""
        sdk = self.teacher.sdk
        attempt = 0
        while True:
            if self.stop.stopping:
                raise _Stopped
            try:
                return await make()
            except sdk.APIError as exc:  # openai.APIError / anthropic.APIError
                error = map_sdk_error(exc, sdk)
            if error.fatal:
                self.stop(fatal=f"{FATAL_STATUS[error.status]} ({error})")
                raise _Stopped
            attempt += 1
            again = error.retryable and attempt <= self.config.teacher.max_retries
            if again:
                await self._sleep(error.retry_after if error.retry_after is not None else min(60.0, 2.0 ** attempt))
            if lost is not None and error.retryable:  # a 400 was refused; a timeout or 5xx may have been accepted
                await lost()
            if not again:
                raise error

    async def _sleep(self, seconds: float) -> None:
        self.next_poll_at = time.monotonic() + seconds
        while not self.stop.stopping and time.monotonic() < self.next_poll_at:
            await asyncio.sleep(min(0.2, max(0.0, self.next_poll_at - time.monotonic())))
