"""Hugging Face inference helpers: load a causal LM, encode a chat, generate, capture token logprobs.

The `local` teacher batches requests onto these; eval answers golden prompts with them; the `vllm` teacher
shares their chat encoding and sampling parameters. Nothing here knows about teachers, runs or records.

Sampling follows the OpenAI API, whatever the model's generation_config.json says: `temperature`
(0 is greedy; default 1.0), `top_p` (default 1.0), `top_k` (default: none), `max_tokens` (alias
`max_new_tokens`) and `seed`. Only the model's end-of-turn and padding tokens are taken from it.
With a seed, torch's generator is seeded before each generate, so a result also depends on which
rows shared its generate.

Token logprobs (`generate_with_logprobs`): every generated token gets its top-k token ids and
logprobs and the sampled token's logprob, from the log_softmax of the model's *raw* logits at
temperature 1 — not of the scores after temperature, top-k or top-p. Those processed scores are the
sampling distribution (with -inf outside top-p), which would make a KL term infinite or meaningless;
distillation wants the model's own distribution, and applies its own temperature later. The capture is a
logits processor that runs before the sampling warpers; it is only installed when logprobs are asked for.

Threads: torch's default (`torch.get_num_threads()`, usually the number of cores) is left alone;
call `torch.set_num_threads()` before the first generate to change it.

The module imports torch and transformers only when a model is loaded or used.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

from apprentice.tokens import TokenLogprobs

from .builtin import resolve_model

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
        max_tokens = as_int(raw_max, "max_tokens") if raw_max is not None else int(default_max_tokens)
        top_k = as_int(params["top_k"], "top_k") if params.get("top_k") is not None else 0
        seed = as_int(params["seed"], "seed") if params.get("seed") is not None else None
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


def as_int(value: Any, name: str) -> int:
    """`value` as an int; a bool or a float with a fraction is a ValueError that names `name`."""
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
