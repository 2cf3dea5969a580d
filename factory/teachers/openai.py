"""OpenAI chat completions, and any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama) via base_url.

With `teacher.logprobs: {top_k: k}` each request asks for `logprobs: true, top_logprobs: k`. The hosted
OpenAI API answers with token *strings* only (and their UTF-8 bytes), never ids: the sidecar then holds
strings, says so in its metadata, and the trainer refuses it for distillation. vLLM answers with ids
when asked (`logprobs.token_ids: true` sends its `return_tokens_as_token_ids`; tokens come back as
"token_id:123"); name the served tokenizer in `logprobs.tokenizer` so the sidecar carries its fingerprint.

`stream` (the raw client only: `can_stream`) asks for a streamed answer and passes each choice's text on as it
arrives; the whole answer, gathered from the chunks, is the TeacherResponse `complete` would have returned
(usage from the last chunk, logprobs from each content chunk's).
"""
from __future__ import annotations

import json
import os
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from apprentice.errors import TeacherError
from apprentice.responses import Choice, TeacherResponse
from apprentice.tokens import TokenLogprobs, from_rows

from ..builtin import resolve_model
from ..logprobs import tokenizer_fingerprint
from ..recipe import StructuredOutput, TeacherConfig
from .batching import BatchState, Call, Outcome
from .hosted import (
    RETRYABLE_STATUS,
    api_key,
    lower_headers,
    map_sdk_error,
    parse_json_body,
    sdk_call_args,
)
from .wire import Wire

# Batch states in which the batch still runs (or is being cancelled).
OPENAI_RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


class OpenAITeacher:
    provider = "openai"
    supports_n = True
    max_useful_concurrency = None
    load_s = None  # nothing loads in this process
    batch_tagged = True  # find_batch reads the run's tag in a batch's metadata

    def __init__(self, config: TeacherConfig) -> None:
        import openai

        self.sdk = openai
        self.model = config.model
        self.params = dict(config.params)
        if "max_new_tokens" in self.params:
            self.params["max_tokens"] = self.params.pop("max_new_tokens")
        self.client = openai.AsyncOpenAI(
            api_key=api_key(config.api_key_env, "OpenAI", config.base_url),
            base_url=config.base_url,
            max_retries=0,  # the limiter owns retries
            timeout=config.timeout_s,
        )
        self._create = self.client.chat.completions.with_raw_response.create
        self.wire = None if config.client == "sdk" else Wire(
            self.client, openai, "chat/completions", timeout_s=config.timeout_s, connections=config.concurrency_cap)
        self.can_stream = self.wire is not None
        self.logprobs = config.logprobs
        self.response_format = _response_format(config.structured_output)
        # The signature of the typed method (create), not of its raw-response wrapper.
        self._signature = self.client.chat.completions.create

    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.params}
        if n > 1:
            body["n"] = n
        if self.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = self.logprobs.top_k
            if self.logprobs.token_ids:
                body["return_tokens_as_token_ids"] = True
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body

    def logprobs_meta(self) -> dict[str, Any]:
        """What the sidecar records about these logprobs; loads `logprobs.tokenizer` when one is named."""
        assert self.logprobs is not None
        tokenizer: dict[str, Any] = {"name": self.logprobs.tokenizer or self.model, "vocab_sha256": None}
        if self.logprobs.tokenizer:
            from transformers import AutoTokenizer

            loaded = AutoTokenizer.from_pretrained(resolve_model(self.logprobs.tokenizer))
            tokenizer = tokenizer_fingerprint(loaded, self.logprobs.tokenizer)
        meta: dict[str, Any] = {
            "token_kind": "ids" if self.logprobs.token_ids else "strings",
            "tokenizer": tokenizer,
            "source": "as reported by the server (chat completions logprobs)",
        }
        if not self.logprobs.token_ids:
            meta["note"] = (
                "token strings only: the OpenAI API returns no token ids, so these logprobs cannot be aligned "
                "with a student's vocabulary for distillation; an OpenAI-compatible server such as vLLM returns "
                "ids with logprobs.token_ids: true"
            )
        return meta

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        if self.wire is not None:
            content, headers = await self.wire.post(body)
        else:
            try:
                raw = await self._create(**sdk_call_args(self._signature, body))
            except self.sdk.OpenAIError as exc:
                raise map_sdk_error(exc, self.sdk) from None
            content, headers = raw.content, lower_headers(raw.headers)
        # Read the JSON directly: building the SDK's pydantic objects costs more CPU than the rest.
        return self.parse(parse_json_body(content, "OpenAI"), headers)

    async def stream(self, body: dict[str, Any],
                     on_text: Callable[[int, str], Awaitable[None]]) -> TeacherResponse:
        """A streamed answer: `on_text(choice index, text)` for each piece of text as it arrives, then the whole
        answer. Raises TeacherError (before or after text was passed on: the caller knows which)."""
        assert self.wire is not None, "can_stream is False with client: sdk"
        seen: set[int] = set()
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        entries: dict[int, list[Any]] = {}
        usage: dict[str, Any] = {}
        events = self.wire.stream({**body, "stream": True, "stream_options": {"include_usage": True}})
        async with aclosing(events):
            async for event in events:
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    index = choice.get("index") or 0
                    seen.add(index)
                    if choice.get("finish_reason"):
                        finish[index] = choice["finish_reason"]
                    rows = (choice.get("logprobs") or {}).get("content")
                    if rows:
                        entries.setdefault(index, []).extend(rows)
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        texts.setdefault(index, []).append(text)
                        await on_text(index, text)
        choices = [{"index": i, "message": {"content": "".join(texts.get(i, ()))}, "finish_reason": finish.get(i),
                    "logprobs": {"content": entries.get(i, [])} if entries else None} for i in sorted(seen)]
        return self.parse({"choices": choices, "usage": usage})

    def parse(self, data: dict[str, Any], headers: dict[str, str] | None = None) -> TeacherResponse:
        """A chat.completion as JSON (an online answer, or one line of a Batch API output file)."""
        try:
            # A model that declines a structured answer says why in `refusal`, with no content.
            choices = [
                Choice(item["message"].get("content") or item["message"].get("refusal") or "",
                       item.get("finish_reason"), self._logprobs(item) if self.logprobs is not None else None)
                for item in sorted(data["choices"], key=lambda c: c.get("index", 0))
            ]
            usage = data.get("usage") or {}
            return TeacherResponse(
                choices=choices,
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                # Part of prompt_tokens, billed at the cached-input price (prompt caching is automatic).
                cached_input_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
                headers=headers or {},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise TeacherError(f"OpenAI answer has an unexpected shape ({exc!r})", retryable=True) from None

    def _logprobs(self, item: dict[str, Any]) -> TokenLogprobs:
        """A choice's `logprobs.content` as arrays; an answer without them is an error, not a silent gap."""
        assert self.logprobs is not None
        content = (item.get("logprobs") or {}).get("content")
        if content is None:
            raise TeacherError(
                "the server returned no logprobs although the request asked for them; remove teacher.logprobs "
                "or use a server that supports them", retryable=False,
            )
        sampled = [float(entry["logprob"]) for entry in content]
        # Best first: a vLLM server lists the sampled token first, then the k best, when the sampled one ranks
        # below them (k + 1 alternatives); cutting that list to k unsorted would drop the k-th best.
        alternatives = [sorted(entry.get("top_logprobs") or [], key=lambda alt: -float(alt["logprob"]))
                        for entry in content]
        tops = [[float(alt["logprob"]) for alt in row] for row in alternatives]
        tokens = [str(entry["token"]) for entry in content]
        top_tokens = [[str(alt["token"]) for alt in row] for row in alternatives]
        if not self.logprobs.token_ids:
            return from_rows(sampled, tops, self.logprobs.top_k, tokens=tokens, top_tokens=top_tokens)
        try:
            ids = [_token_id(token) for token in tokens]
            top_ids = [[_token_id(token) for token in row] for row in top_tokens]
        except ValueError as exc:
            raise TeacherError(
                f"logprobs.token_ids is set but the server returned token strings ({exc}); "
                "return_tokens_as_token_ids is a vLLM option: unset logprobs.token_ids for other servers",
                retryable=False,
            ) from None
        return from_rows(sampled, tops, self.logprobs.top_k, sampled_ids=ids, top_ids=top_ids)

    # ---- Batch API hooks (factory/batch.py drives them; see factory/teachers/batching.py) ----------------
    def batch_entry(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}

    async def submit_batch(self, path: Path, *, file_id: str | None, tag: str, call: Call,
                           uploaded: Callable[[str], None]) -> str:
        client = self.client
        if file_id is None:
            data = path.read_bytes()
            file_id = (await call(lambda: client.files.create(file=(path.name, data), purpose="batch"))).id
            uploaded(file_id)
        created = await call(lambda: client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"apprentice": tag}), once=True)
        return created.id

    async def find_batch(self, *, tag: str, count: int, since: float, call: Call) -> list[str]:
        """By the run's tag in the batch's metadata: certain."""
        page = await call(lambda: self.client.batches.list(limit=100))
        async for found in page:
            if (found.metadata or {}).get("apprentice") == tag:
                return [found.id]
            if found.created_at < since:
                break
        return []

    async def batch_status(self, provider_id: str, call: Call) -> BatchState:
        info = await call(lambda: self.client.batches.retrieve(provider_id))
        counts = info.request_counts
        answered = (counts.completed + counts.failed) if counts else 0
        return BatchState(info.status, info.status not in OPENAI_RUNNING, answered, info)

    def batch_failure(self, state: BatchState) -> str | None:
        if state.status != "failed":
            return None
        info = state.info
        errors = "; ".join(f"{e.code}: {e.message}" for e in (info.errors.data if info.errors else []) or [])
        return f"batch failed validation: {errors or 'no reason given'}"

    async def batch_outcomes(self, state: BatchState, provider_id: str, files: Path, name: str,
                             call: Call) -> AsyncIterator[Outcome]:
        """The output file, then the error file, each downloaded to `files` first (streamed to disk, then
        read a line at a time; a crash while reading costs no second download)."""
        for kind, file_id in (("output", state.info.output_file_id), ("errors", state.info.error_file_id)):
            if not file_id:
                continue
            path = files / f"{name}.{kind}.jsonl"
            if not path.exists():
                await call(lambda: self._download(file_id, path))
            with path.open("r", encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield _batch_outcome(json.loads(line))

    async def _download(self, file_id: str, path: Path) -> None:
        part = path.with_suffix(".part")
        async with self.client.files.with_streaming_response.content(file_id) as response:
            with part.open("wb") as handle:
                async for chunk in response.iter_bytes():
                    handle.write(chunk)
        os.replace(part, path)

    async def aclose(self) -> None:
        if self.wire is not None:
            await self.wire.aclose()
        await self.client.close()


def _response_format(structured: StructuredOutput | None) -> dict[str, Any] | None:
    """`teacher.structured_output` as OpenAI's strict json_schema response format: the answer is the JSON."""
    if structured is None:
        return None
    schema: dict[str, Any] = {"name": structured.name, "strict": True, "schema": structured.json_schema}
    if structured.description:
        schema["description"] = structured.description
    return {"type": "json_schema", "json_schema": schema}


def _batch_outcome(entry: dict[str, Any]) -> Outcome:
    """One line of a Batch API output or error file."""
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


def _token_id(token: str) -> int:
    """vLLM writes a token as "token_id:123" under return_tokens_as_token_ids."""
    prefix, _, number = token.partition(":")
    if prefix != "token_id" or not number.isdigit():
        raise ValueError(f"{token!r} is not token_id:<n>")
    return int(number)
