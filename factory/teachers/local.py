"""A teacher that runs a Hugging Face causal LM in this process, with micro-batching.

Concurrent `complete()` calls are queued; one batcher task takes up to `batch_size` sequences (a
request for n completions counts as n) whose sampling parameters agree, runs one `model.generate`
on them in a worker thread (one generate at a time), and hands each caller its answer. Batches are
left-padded, and when more requests wait than fit, the oldest one goes first with those closest to
its prompt length, so that little compute goes to padding.

Sampling follows the OpenAI API, whatever the model's generation_config.json says: `temperature`
(0 is greedy; default 1.0), `top_p` (default 1.0), `top_k` (default: none), `max_tokens` (alias
`max_new_tokens`) and `seed`. Only the model's end-of-turn and padding tokens are taken from it.
With a seed, torch's generator is seeded before each generate, so a result also depends on which
requests shared its batch.

Teacher logprobs (`teacher.logprobs: {top_k: k}`): every generated token gets its top-k token ids and
logprobs and the sampled token's logprob, from the log_softmax of the model's *raw* logits at
temperature 1 — not of the scores after temperature, top-k or top-p. Those processed scores are the
sampling distribution (with -inf outside top-p), which would make a KL term infinite or meaningless;
distillation wants the model's own distribution, and applies its own temperature later. The capture is a
logits processor that runs before the sampling warpers; it is only installed when logprobs are asked for.

Threads: torch's default (`torch.get_num_threads()`, usually the number of cores) is left alone;
call `torch.set_num_threads()` before the first request to change it.

The module imports torch and transformers only when a model is loaded or used.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from apprentice.errors import TeacherError
from apprentice.responses import Choice, TeacherResponse
from apprentice.tokens import TokenLogprobs

if TYPE_CHECKING:
    from ..recipe import TeacherConfig

SUPPORTED_PARAMS = ("temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "seed")
DEFAULT_MAX_TOKENS = 512


class Completion(NamedTuple):
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached first)
    output_tokens: int  # generated tokens, the end-of-turn token included


# ---- parameters ------------------------------------------------------------------------------------
def normalize_params(params: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS, *,
                     provider: str = "local", extra: Sequence[str] = ()) -> dict[str, Any]:
    """Canonical sampling parameters: fixed types, defaults written out, aliases resolved.

    Always has temperature (float), top_p (float) and max_tokens (int); top_k (int > 0) and seed (int)
    only when given. Names in `extra` (another backend's own parameters) are passed through unchecked for
    the caller to validate. Raises ValueError for a parameter the backend does not support or a bad value.
    """
    unknown = sorted(set(params) - set(SUPPORTED_PARAMS) - set(extra))
    if unknown:
        raise ValueError(
            f"provider {provider} does not support params {', '.join(unknown)}; supported: "
            f"temperature, top_p, top_k, max_tokens (or max_new_tokens), seed{''.join(', ' + e for e in extra)}"
        )
    if "max_tokens" in params and "max_new_tokens" in params and params["max_tokens"] != params["max_new_tokens"]:
        raise ValueError("params.max_tokens and params.max_new_tokens disagree; set only one")
    try:
        temperature = float(params["temperature"]) if params.get("temperature") is not None else 1.0
        top_p = float(params["top_p"]) if params.get("top_p") is not None else 1.0
        raw_max = params.get("max_tokens", params.get("max_new_tokens"))
        max_tokens = _as_int(raw_max, "max_tokens") if raw_max is not None else int(default_max_tokens)
        top_k = _as_int(params["top_k"], "top_k") if params.get("top_k") is not None else 0
        seed = _as_int(params["seed"], "seed") if params.get("seed") is not None else None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"provider {provider}: bad sampling parameter: {exc}") from None
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"params.temperature must be >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"params.top_p must be in (0, 1], got {top_p}")
    if max_tokens < 1:
        raise ValueError(f"params.max_tokens must be at least 1, got {max_tokens}")
    if top_k < 0:
        raise ValueError(f"params.top_k must be >= 0 (0: off), got {top_k}")
    out: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    if top_k:
        out["top_k"] = top_k
    if seed is not None:
        out["seed"] = seed
    out.update((name, params[name]) for name in extra if params.get(name) is not None)
    return out


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


# ---- loading ---------------------------------------------------------------------------------------
def pick_device(requested: str | None = None) -> str:
    """`requested`, else cuda when available, else cpu."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a model name (`builtin:...`, HF id or local path), in eval mode on `device`.

    float32 on cpu; bfloat16 on cuda (float16 where bf16 is unsupported). The tokenizer pads on the left
    and must have a chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..builtin import resolve_model

    path = resolve_model(name)
    device = pick_device(device)
    dtype = torch.float32
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{name}: the tokenizer has no chat template; use an instruct/chat model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---- generation ------------------------------------------------------------------------------------
def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt token ids: the chat template applied, with the assistant turn opened."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "keys"):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the model has no end-of-sequence token (generation_config.eos_token_id)")
    return sorted(ids)


def generate_ids(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Completion]:
    """One `generate` over prompt token rows (one completion a row), left-padded; answers in row order.

    `should_stop`, polled after every step, ends the generate early (its answers are then cut short).
    """
    return _generate(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=seed, should_stop=should_stop, top_logprobs=0)[0]


def generate_with_logprobs(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Sequence[int]],
    *,
    top_logprobs: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[Completion], list[TokenLogprobs]]:
    """`generate_ids`, plus each completion's token logprobs (raw logits at temperature 1, see the module
    docstring): one row per generated token, the end-of-turn token included when the model stopped."""
    if top_logprobs < 1:
        raise ValueError(f"top_logprobs must be at least 1, got {top_logprobs}")
    return _generate(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=seed, should_stop=should_stop, top_logprobs=top_logprobs)


def _generate(model: Any, tokenizer: Any, rows: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, seed: int | None, should_stop: Callable[[], bool] | None,
              top_logprobs: int) -> tuple[list[Completion], list[TokenLogprobs]]:
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    if not rows:
        return [], []
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    device = model.device
    input_ids, attention = input_ids.to(device), attention.to(device)

    # Every knob is set, so that nothing comes from the model's generation_config but eos and pad.
    common = dict(
        max_new_tokens=int(max_new_tokens),
        num_return_sequences=1,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        typical_p=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if temperature > 0:
        config = GenerationConfig(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                                  top_k=int(top_k), **common)
    else:  # greedy; the sampling knobs at their global defaults so that transformers does not warn
        config = GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, **common)

    criteria = None
    if should_stop is not None:

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

        criteria = StoppingCriteriaList([_Stop()])

    capture = _CaptureTopLogprobs(top_logprobs) if top_logprobs else None
    with torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention, generation_config=config, stopping_criteria=criteria,
            logits_processor=LogitsProcessorList([capture]) if capture is not None else None,
        )
    generated_t = output[:, width:]
    generated = generated_t.tolist()
    eos_set = set(eos)
    results: list[Completion] = []
    for tokens in generated:
        end = next((i for i, tok in enumerate(tokens) if tok in eos_set), None)
        if end is None:
            kept, count, reason = tokens, len(tokens), "length"
        else:
            kept, count, reason = tokens[:end], end + 1, "stop"
        results.append(Completion(tokenizer.decode(kept, skip_special_tokens=True), reason, count))
    if capture is None:
        return results, []
    return results, capture.per_row(generated_t, [c.output_tokens for c in results])


class _CaptureTopLogprobs:
    """A logits processor that changes nothing and records, at every step, the top-k logprobs of the
    scores it is given and the logprob of the token sampled at the previous step.

    generate() runs the processors it builds itself first (none with our GenerationConfig: no repetition
    penalty, no forced or suppressed tokens, no minimum length), then the ones passed in, then the sampling
    warpers (temperature, top-k, top-p). So this one sees the model's raw logits.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.top_values: list[Any] = []
        self.top_ids: list[Any] = []
        self.sampled: list[Any] = []
        self._last: Any = None  # the previous step's full log_softmax, for the token sampled from it

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logprobs = torch.log_softmax(scores.float(), dim=-1)
        if self._last is not None:
            self.sampled.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        values, ids = logprobs.topk(min(self.k, logprobs.shape[-1]), dim=-1)
        self.top_values.append(values)
        self.top_ids.append(ids)
        self._last = logprobs
        return scores

    def per_row(self, generated: Any, counts: list[int]) -> list[TokenLogprobs]:
        """One TokenLogprobs per row, cut to that row's `counts[i]` generated tokens."""
        import numpy as np
        import torch

        steps = generated.shape[1]
        if steps == 0 or not self.top_values:
            empty = [np.zeros(0, np.float32), np.zeros((0, self.k), np.float32), np.zeros(0, np.int32),
                     np.zeros((0, self.k), np.int32)]
            return [TokenLogprobs(empty[0], empty[1], empty[2], empty[3]) for _ in counts]
        # generate() may run a step or two past the end and drop them (deferred stop checks): keep `steps`.
        if len(self.sampled) < steps:
            self.sampled.append(self._last.gather(1, generated[:, steps - 1:steps].to(self._last.device)).squeeze(1))
        sampled = torch.stack(self.sampled[:steps], dim=1).cpu().numpy().astype(np.float32)
        values = torch.stack(self.top_values[:steps], dim=1).cpu().numpy().astype(np.float32)
        ids = torch.stack(self.top_ids[:steps], dim=1).cpu().numpy().astype(np.int32)
        tokens = generated.cpu().numpy().astype(np.int32)
        if values.shape[-1] < self.k:  # a vocabulary smaller than k
            pad = self.k - values.shape[-1]
            values = np.concatenate([values, np.full(values.shape[:2] + (pad,), -np.inf, np.float32)], axis=-1)
            ids = np.concatenate([ids, np.full(ids.shape[:2] + (pad,), -1, np.int32)], axis=-1)
        return [
            TokenLogprobs(sampled_logprobs=sampled[i, :n].copy(), top_logprobs=values[i, :n].copy(),
                          sampled_ids=tokens[i, :n].copy(), top_ids=ids[i, :n].copy())
            for i, n in enumerate(counts)
        ]


def generate_batch(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    *,
    top_k: int = 0,
    seed: int | None = None,
    batch_size: int | None = None,
) -> list[list[Completion]]:
    """n completions for each conversation: `result[i][j]` is (text, finish_reason, output_tokens).

    Conversations are sorted by prompt length and cut into generate calls of at most `batch_size`
    sequences (default: all at once), then put back in their order.
    """
    prompts = [encode_chat(tokenizer, messages) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_call = max(1, (batch_size or len(prompts) * n or 1) // n)
    results: list[list[Completion]] = [[] for _ in prompts]
    for start in range(0, len(order), per_call):
        chunk = order[start:start + per_call]
        rows = [prompts[i] for i in chunk for _ in range(n)]
        out = generate_ids(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed)
        for pos, i in enumerate(chunk):
            results[i] = out[pos * n:(pos + 1) * n]
    return results


def ids_logprobs_meta(model: str, tokenizer: Any = None) -> dict[str, Any]:
    """The sidecar's description of token-id logprobs from an in-process model (`local`, `vllm`): the
    tokenizer's fingerprint (the model's own tokenizer, loaded when not given) and what the values are."""
    from ..logprobs import tokenizer_fingerprint

    if tokenizer is None:
        from transformers import AutoTokenizer

        from ..builtin import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return {
        "token_kind": "ids",
        "tokenizer": tokenizer_fingerprint(tokenizer, model),
        "source": "log_softmax of the model's raw logits at temperature 1 (before temperature, top-k, top-p)",
    }


# ---- request bodies of the in-process teachers (local, vllm) ---------------------------------------
def build_body(model: str, messages: list[dict[str, str]], n: int, params: dict[str, Any],
               top_logprobs: int) -> dict[str, Any]:
    """The body an in-process teacher keys its cache on: the messages, n, every sampling parameter written out."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        "n": int(n),
    }
    body.update(params)
    if top_logprobs:
        body["top_logprobs"] = top_logprobs
    return body


def read_body(body: dict[str, Any], model: str, names: Sequence[str]) -> tuple[list[dict[str, str]], int,
                                                                               dict[str, Any], int]:
    """A body back as (messages, n, the sampling parameters among `names`, top_logprobs); ValueError if bad."""
    if body.get("model", model) != model:
        raise ValueError(f"body is for model {body['model']!r}, this teacher runs {model!r}")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    n = _as_int(body.get("n", 1), "n")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    top_logprobs = _as_int(body.get("top_logprobs", 0), "top_logprobs")
    if top_logprobs < 0:
        raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
    return messages, n, {k: body[k] for k in names if k in body}, top_logprobs


# ---- the teacher -----------------------------------------------------------------------------------
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
