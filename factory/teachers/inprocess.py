"""What the in-process teachers (`local`, `vllm`) share: the request body their cache is keyed on, read back
when it comes to be answered, and the sidecar's description of their token-id logprobs."""
from __future__ import annotations

from typing import Any, Sequence

from ..builtin import resolve_model
from ..hf import as_int
from ..logprobs import tokenizer_fingerprint


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
    n = as_int(body.get("n", 1), "n")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    top_logprobs = as_int(body.get("top_logprobs", 0), "top_logprobs")
    if top_logprobs < 0:
        raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
    return messages, n, {k: body[k] for k in names if k in body}, top_logprobs


def ids_logprobs_meta(model: str, tokenizer: Any = None) -> dict[str, Any]:
    """The sidecar's description of token-id logprobs from an in-process model (`local`, `vllm`): the
    tokenizer's fingerprint (the model's own tokenizer, loaded when not given) and what the values are."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return {
        "token_kind": "ids",
        "tokenizer": tokenizer_fingerprint(tokenizer, model),
        "source": "log_softmax of the model's raw logits at temperature 1 (before temperature, top-k, top-p)",
    }

