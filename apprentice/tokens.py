"""A teacher's token logprobs (`TokenLogprobs`) and their JSON codec for the response cache.

Shared vocabulary: teachers make them, the cache stores them, the sidecar (factory/logprobs.py) writes them
to disk, the trainer reads them. numpy is imported where the arrays are made, so importing this is light.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class TokenLogprobs:
    """The teacher's logprobs for one completion: one row per generated token, the stop token included
    when the teacher emitted one (a student must learn to stop too).

    Arrays are numpy (float32 / int32). `top_*` rows hold the k most likely tokens, best first; a row
    with fewer than k alternatives is padded with logprob -inf (id -1, token ""). Ids are None where the
    server returned token strings only (hosted OpenAI); strings are None where the teacher gave ids only
    (the local provider), because a string is then just `tokenizer.decode([id])`.
    """

    sampled_logprobs: Any                  # float32 [T]
    top_logprobs: Any                      # float32 [T, k]
    sampled_ids: Any = None                # int32 [T]
    top_ids: Any = None                    # int32 [T, k]
    tokens: list[str] | None = None        # [T]
    top_tokens: list[list[str]] | None = None  # [T][k]

    def __len__(self) -> int:
        return len(self.sampled_logprobs)


def mean_logprob(lp: TokenLogprobs | None, finish_reason: str | None, *, stop_row: bool = True) -> float | None:
    """An answer's confidence: the mean log-probability of its own tokens, the end-of-turn token left out
    (`stop_row`: the logprobs hold a row for it when the answer stopped, as in-process models' do). The one
    measure of the eval's cascade curve and of the serve router's cascade; None for an answer without tokens."""
    if lp is None:
        return None
    values = lp.sampled_logprobs
    if stop_row and finish_reason == "stop":
        values = values[:-1]
    return float(values.mean()) if len(values) else None


# ---- arrays ------------------------------------------------------------------------------------------
def from_rows(
    sampled: list[float], tops: list[list[float]], k: int, *, sampled_ids: list[int] | None = None,
    top_ids: list[list[int]] | None = None, tokens: list[str] | None = None,
    top_tokens: list[list[str]] | None = None,
) -> TokenLogprobs:
    """A TokenLogprobs from per-token Python lists (an API's JSON), each top row cut or padded to k."""
    import numpy as np

    count = len(sampled)
    top_lp = np.full((count, k), -np.inf, np.float32)
    for i, row in enumerate(tops):
        row = row[:k]
        top_lp[i, : len(row)] = row
    out = TokenLogprobs(sampled_logprobs=np.asarray(sampled, np.float32).reshape(count), top_logprobs=top_lp)
    if sampled_ids is not None and top_ids is not None:
        ids = np.full((count, k), -1, np.int32)
        for i, row in enumerate(top_ids):
            row = row[:k]
            ids[i, : len(row)] = row
        out.sampled_ids = np.asarray(sampled_ids, np.int32).reshape(count)
        out.top_ids = ids
    if tokens is not None and top_tokens is not None:
        out.tokens = list(tokens)
        out.top_tokens = [list(row[:k]) + [""] * (k - len(row[:k])) for row in top_tokens]
    return out


def _b64(array: Any) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def _unb64(text: str, dtype: Any, shape: tuple[int, ...]) -> Any:
    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape).copy()


def logprobs_to_json(lp: TokenLogprobs) -> dict[str, Any]:
    """JSON for the response cache: arrays as base64 (a third of the size of JSON numbers, and exact)."""
    count, k = lp.top_logprobs.shape
    data: dict[str, Any] = {"n": count, "k": k, "lp": _b64(lp.sampled_logprobs), "top": _b64(lp.top_logprobs)}
    if lp.sampled_ids is not None:
        data["ids"] = _b64(lp.sampled_ids)
        data["top_ids"] = _b64(lp.top_ids)
    if lp.tokens is not None:
        data["tokens"] = lp.tokens
        data["top_tokens"] = lp.top_tokens
    return data


def logprobs_from_json(data: dict[str, Any]) -> TokenLogprobs:
    import numpy as np

    count, k = int(data["n"]), int(data["k"])
    out = TokenLogprobs(_unb64(data["lp"], np.float32, (count,)), _unb64(data["top"], np.float32, (count, k)))
    if "ids" in data:
        out.sampled_ids = _unb64(data["ids"], np.int32, (count,))
        out.top_ids = _unb64(data["top_ids"], np.int32, (count, k))
    if "tokens" in data:
        out.tokens, out.top_tokens = data["tokens"], data["top_tokens"]
    return out
