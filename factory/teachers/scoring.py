"""Scoring given tokens with a teacher behind an OpenAI-compatible vLLM server: the teacher's log-probabilities
of a completion it did not write (a student's sample), for on-policy distillation.

One request per sequence to `/v1/completions`: the prompt and the completion as token ids, `prompt_logprobs: k`
(vLLM's: for every prompt token, its own log-probability and the k best at that position, keyed by token id),
`echo: true`, `max_tokens: 1` (the server must generate something) and `temperature: 1, top_p: 1`: the scores
are the model's distribution itself, which truncated sampling would distort. The request goes through the
factory's request path (teachers/wire.py: the SDK's URL and headers, its error wording) and its limiter
(concurrency, rpm/tpm caps, retries with backoff, the circuit breaker).

Not here yet: the factory's response cache and price table (a served scorer's cost is counted in tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apprentice.errors import TeacherError
from apprentice.responses import TeacherResponse
from apprentice.tokens import TokenLogprobs, from_rows

from ..limiter import Limiter
from ..recipe import TeacherConfig
from .hosted import api_key, parse_json_body
from .wire import Wire


@dataclass
class ServedScores:
    logprobs: TokenLogprobs  # one row per completion token: its own logprob, and the k best ids and logprobs
    input_tokens: int        # what the server read (prompt + completion), as its usage reports


class ServedScorer:
    def __init__(self, config: TeacherConfig, top_k: int = 20) -> None:
        import openai

        if config.provider != "openai" or not isinstance(config.base_url, str):
            raise TeacherError(f"scoring a student's tokens needs an OpenAI-compatible vLLM server: provider openai "
                               f"with one base_url (got provider {config.provider}, base_url {config.base_url})",
                               retryable=False)
        self.model = config.model
        self.top_k = top_k
        self.client = openai.AsyncOpenAI(api_key=api_key(config.api_key_env, "OpenAI", config.base_url),
                                         base_url=config.base_url, max_retries=0, timeout=config.timeout_s)
        self.wire = Wire(self.client, openai, "completions", timeout_s=config.timeout_s,
                         connections=config.concurrency_cap)
        self.limiter = Limiter(max_concurrency=config.concurrency_cap, rpm=config.rpm, tpm=config.tpm,
                               max_retries=config.max_retries)

    def build_request(self, token_ids: list[int]) -> dict[str, Any]:
        return {"model": self.model, "prompt": token_ids, "max_tokens": 1, "temperature": 1.0, "top_p": 1.0,
                "echo": True, "prompt_logprobs": self.top_k}

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> ServedScores:
        """The teacher's scores of `completion_ids` after `prompt_ids` (the teacher's prompt, context included)."""
        body = self.build_request(list(prompt_ids) + list(completion_ids))
        answer: dict[str, Any] = {}

        async def call() -> TeacherResponse:
            content, headers = await self.wire.post(body)
            data = parse_json_body(content, "OpenAI")
            answer["data"] = data
            usage = data.get("usage") or {}
            return TeacherResponse(choices=[], input_tokens=int(usage.get("prompt_tokens") or 0),
                                   output_tokens=int(usage.get("completion_tokens") or 0), headers=headers)

        response, _ = await self.limiter.run(call, input_tokens=len(body["prompt"]), output_tokens=1)
        return ServedScores(parse_prompt_logprobs(answer["data"], len(prompt_ids), completion_ids, self.top_k),
                            response.input_tokens)

    async def aclose(self) -> None:
        await self.wire.aclose()
        await self.client.close()


def parse_prompt_logprobs(data: dict[str, Any], prompt_length: int, completion_ids: list[int],
                          k: int) -> TokenLogprobs:
    """The completion's rows of vLLM's `prompt_logprobs` (a list over the prompt's tokens, None first; each a
    {token_id: {logprob, rank, decoded_token}} holding that token and the k best)."""
    try:
        rows = data["choices"][0]["prompt_logprobs"]
        if rows is None:
            raise KeyError("prompt_logprobs")
        sampled, tops, top_ids = [], [], []
        for position, token in enumerate(completion_ids, start=prompt_length):
            entry = {int(key): value for key, value in rows[position].items()}
            sampled.append(float(entry[token]["logprob"]))
            best = sorted(entry.items(), key=lambda item: -float(item[1]["logprob"]))[:k]
            tops.append([float(value["logprob"]) for _, value in best])
            top_ids.append([token_id for token_id, _ in best])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise TeacherError(f"the server's answer has no usable prompt_logprobs ({exc!r}); prompt_logprobs is a "
                           "vLLM option: serve the teacher with vLLM (--max-logprobs at least top_k)",
                           retryable=False) from None
    return from_rows(sampled, tops, k, sampled_ids=list(completion_ids), top_ids=top_ids)
