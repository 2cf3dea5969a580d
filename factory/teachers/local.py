"""A teacher that runs a Hugging Face causal LM in this process, with micro-batching.

Concurrent `complete()` calls are queued; one batcher task takes up to `batch_size` sequences (a
request for n completions counts as n) whose sampling parameters agree, runs one `model.generate`
on them in a worker thread (one generate at a time), and hands each caller its answer. Batches are
left-padded, and when more requests wait than fit, the oldest one goes first with those closest to
its prompt length, so that little compute goes to padding.

Sampling parameters, teacher logprobs (`teacher.logprobs: {top_k: k}`: from the model's raw logits at
temperature 1) and threads are those of `factory.hf`, which loads and runs the model; a seeded result
also depends on which requests shared its batch.

The module imports torch and transformers only when a model is loaded or used.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from apprentice.errors import TeacherError
from apprentice.responses import Choice, TeacherResponse
from apprentice.tokens import TokenLogprobs

from ..hf import SUPPORTED_PARAMS, encode_chat, generate_ids, generate_with_logprobs, load_model, normalize_params
from .inprocess import build_body, ids_logprobs_meta, read_body

if TYPE_CHECKING:
    from ..recipe import TeacherConfig


@dataclass(eq=False)
class _Request:
    messages: list[dict[str, str]]
    n: int
    params: dict[str, Any]
    future: asyncio.Future
    key: tuple = ()
    ids: list[int] | None = None
    error: TeacherError | None = field(default=None)
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        self.key = tuple(sorted(self.params.items())) + (("top_logprobs", self.top_logprobs),)


class LocalTeacher:
    """The `local` provider: a transformers model in this process, batched across concurrent requests."""

    provider = "local"
    supports_n = True
    can_stream = False  # answers whole (see base.Teacher.can_stream)

    def __init__(self, config: "TeacherConfig") -> None:
        self.config = config
        self.model = config.model
        self.batch_size = int(config.batch_size)
        # One batch running, the next ones queued: enough waiting to fill batches and sort them by length.
        self.max_useful_concurrency = max(4, self.batch_size * 4)
        self.params = normalize_params(dict(config.params), config.max_tokens)
        self.device = config.device
        self.top_logprobs = config.logprobs.top_k if config.logprobs is not None else 0
        # Seconds the batcher waits for more requests when a batch is not full (requests that arrive
        # together are all queued well within it).
        self.linger_s = 0.002
        self.generate_calls = 0  # generate() calls made; for tests and stats
        self.load_s: float | None = None  # seconds the model took to load, once loaded; for the manifest
        self._lm: tuple[Any, Any] | None = None
        self._load_error: TeacherError | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Request] | None = None
        self._pending: list[_Request] = []
        self._batcher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._running: concurrent.futures.Future | None = None
        self._current: list[_Request] = []  # the batch being generated

    # ---- protocol --------------------------------------------------------------------------------
    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        return build_body(self.model, messages, n, self.params, self.top_logprobs)

    def logprobs_meta(self) -> dict[str, Any]:
        """What the sidecar records about these logprobs: the tokenizer's fingerprint, the ids' meaning."""
        return ids_logprobs_meta(self.model, self._lm[1] if self._lm is not None else None)

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        try:
            request = self._parse(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise TeacherError(f"bad request body for the local teacher: {exc}", retryable=False) from None
        if self._load_error is not None:
            raise self._load_error
        loop = asyncio.get_running_loop()
        request.future = loop.create_future()
        self._ensure_batcher(loop)
        assert self._queue is not None
        self._queue.put_nowait(request)
        return await request.future

    async def aclose(self) -> None:
        """Stop the batcher (a running generate ends after its current step) and free the model."""
        self._stop.set()
        running, current = self._running, list(self._current)  # the batcher forgets both when cancelled
        try:
            if self._batcher is not None and not self._batcher.done():
                self._batcher.cancel()
                try:
                    await self._batcher
                except BaseException:  # noqa: BLE001 - CancelledError or the batcher's own failure
                    pass
            if running is not None:  # let the worker finish its step, so that the model is not in use
                try:
                    await asyncio.wrap_future(running)
                except BaseException:  # noqa: BLE001
                    pass
            closed = TeacherError("the local teacher was closed", retryable=False)
            for request in current + self._drain():
                if not request.future.done():
                    request.future.set_exception(closed)
            if self._executor is not None:
                self._executor.shutdown(wait=False)
        finally:
            self._executor = None
            self._batcher = None
            self._queue = None
            self._loop = None
            self._running = None
            self._current = []
            self._lm = None
            self._stop.clear()

    # ---- batching --------------------------------------------------------------------------------
    def _parse(self, body: dict[str, Any]) -> _Request:
        messages, n, params, top_logprobs = read_body(body, self.model, SUPPORTED_PARAMS)
        return _Request(messages=messages, n=n, params=normalize_params(params, self.config.max_tokens),
                        future=None, top_logprobs=top_logprobs)  # type: ignore[arg-type]

    def _ensure_batcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._batcher is not None and not self._batcher.done() and self._loop is loop:
            return
        # First use, or a new event loop (the old one's queue and task cannot be used from this one).
        self._loop = loop
        self._queue = asyncio.Queue()
        self._pending = []
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-teacher")
        self._batcher = loop.create_task(self._batch_loop(), name="local-teacher-batcher")

    def _drain(self) -> list[_Request]:
        drained, self._pending = self._pending, []
        while self._queue is not None and not self._queue.empty():
            drained.append(self._queue.get_nowait())
        return drained

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._executor is not None
        self._running = self._executor.submit(fn, *args)
        try:
            return await asyncio.wrap_future(self._running)
        finally:
            self._running = None

    async def _batch_loop(self) -> None:
        try:
            await self._batch_loop_inner()
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            error = TeacherError(f"local teacher batcher failed: {type(exc).__name__}: {exc}", retryable=False)
            for request in self._current + self._drain():
                if not request.future.done():
                    request.future.set_exception(error)
            self._current = []

    async def _batch_loop_inner(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            if not self._pending:
                self._pending.append(await queue.get())
            if self._lm is None:
                try:
                    began = time.monotonic()
                    self._lm = await self._in_worker(load_model, self.model, self.device)
                    self.load_s = time.monotonic() - began
                except Exception as exc:  # noqa: BLE001
                    # 404 tells the pipeline to stop the run: no request can succeed without the model.
                    self._load_error = TeacherError(
                        f"could not load local model {self.model!r}: {type(exc).__name__}: {exc}",
                        retryable=False, status=404,
                    )
                    for request in self._drain():
                        if not request.future.done():
                            request.future.set_exception(self._load_error)
                    return
            await self._collect(queue)
            batch = self._pick_batch()
            if batch:
                await self._run_batch(batch)

    async def _collect(self, queue: asyncio.Queue) -> None:
        """Move queued requests to pending; wait a moment for more when they would not fill a batch."""
        for attempt in range(2):
            while not queue.empty():
                self._pending.append(queue.get_nowait())
            self._pending = [r for r in self._pending if not r.future.done()]  # callers that gave up
            if attempt or sum(r.n for r in self._pending) >= self.batch_size:
                break
            await asyncio.sleep(self.linger_s)
        untokenized = [r for r in self._pending if r.ids is None]
        if untokenized:
            await self._in_worker(self._tokenize, untokenized)
        for request in [r for r in self._pending if r.error is not None]:
            self._pending.remove(request)
            if not request.future.done():
                request.future.set_exception(request.error)

    def _tokenize(self, requests: list[_Request]) -> None:
        assert self._lm is not None
        _, tokenizer = self._lm
        for request in requests:
            try:
                request.ids = encode_chat(tokenizer, request.messages)
            except Exception as exc:  # noqa: BLE001 - a template that rejects these messages
                request.error = TeacherError(f"chat template failed: {type(exc).__name__}: {exc}", retryable=False)

    def _pick_batch(self) -> list[_Request]:
        """The oldest request, plus compatible ones closest to its prompt length, up to batch_size sequences."""
        if not self._pending:
            return []
        head = self._pending[0]
        room = self.batch_size - head.n
        others = [r for r in self._pending[1:] if r.key == head.key]
        others.sort(key=lambda r: abs(len(r.ids or ()) - len(head.ids or ())))
        batch = [head]
        for request in others:
            if request.n <= room:
                batch.append(request)
                room -= request.n
                if room == 0:
                    break
        chosen = set(map(id, batch))
        self._pending = [r for r in self._pending if id(r) not in chosen]
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        self._current = list(batch)
        try:
            results: list[Any]
            try:
                results = await self._in_worker(self._generate, batch)
            except Exception as exc:  # noqa: BLE001
                if len(batch) == 1 or self._stop.is_set():
                    self._fail(batch, exc)
                    return
                # Find the request that broke the batch: run each alone, so that the others still get answers.
                results = []
                for request in batch:
                    try:
                        results.extend(await self._in_worker(self._generate, [request]))
                    except Exception as alone:  # noqa: BLE001
                        results.append(alone)
            for request, result in zip(batch, results):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    self._fail([request], result)
                else:
                    request.future.set_result(result)
        finally:
            self._current = []

    def _fail(self, batch: list[_Request], exc: BaseException) -> None:
        error = TeacherError(f"local generate failed: {type(exc).__name__}: {exc}", retryable=False)
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    def _generate(self, batch: list[_Request]) -> list[TeacherResponse]:
        """Worker thread: one generate for the whole batch, split back into one response per request."""
        assert self._lm is not None
        model, tokenizer = self._lm
        params = batch[0].params
        rows = [request.ids for request in batch for _ in range(request.n)]
        self.generate_calls += 1
        sampling = dict(
            max_new_tokens=params["max_tokens"], temperature=params["temperature"], top_p=params["top_p"],
            top_k=params.get("top_k", 0), seed=params.get("seed"), should_stop=self._stop.is_set,
        )
        top_logprobs = batch[0].top_logprobs  # part of the batch key: the same for the whole batch
        logprobs: list[TokenLogprobs | None]
        if top_logprobs:
            completions, captured = generate_with_logprobs(model, tokenizer, rows, top_logprobs=top_logprobs,
                                                           **sampling)  # type: ignore[arg-type]
            logprobs = list(captured)
        else:
            completions = generate_ids(model, tokenizer, rows, **sampling)  # type: ignore[arg-type]
            logprobs = [None] * len(completions)
        if self._stop.is_set():
            raise RuntimeError("stopped")
        responses = []
        start = 0
        for request in batch:
            mine = completions[start:start + request.n]
            mine_logprobs = logprobs[start:start + request.n]
            start += request.n
            responses.append(TeacherResponse(
                choices=[Choice(c.text, c.finish_reason, lp) for c, lp in zip(mine, mine_logprobs)],
                input_tokens=len(request.ids or ()),
                output_tokens=sum(c.output_tokens for c in mine),
            ))
        return responses
