"""Anthropic Messages API. It has no `n`: the pipeline sends one request per sample.

`teacher.structured_output` is a tool the model must call (`tool_choice` names it): its input is the answer,
kept as the choice's text in JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from apprentice.errors import TeacherError
from apprentice.responses import Choice, TeacherResponse

from ..recipe import StructuredOutput, TeacherConfig
from .batching import BatchState, Call, Outcome, epoch
from .hosted import api_key, lower_headers, map_sdk_error, parse_json_body, sdk_call_args
from .wire import Wire

# Anthropic's stop reasons in the OpenAI vocabulary the checks use; others (refusal, tool_use) pass as they are.
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


class AnthropicTeacher:
    provider = "anthropic"
    supports_n = False
    can_stream = False  # answers whole (see base.Teacher.can_stream)
    max_useful_concurrency = None
    load_s = None  # nothing loads in this process
    batch_tagged = False  # find_batch matches by request count and creation time (see there)

    def __init__(self, config: TeacherConfig) -> None:
        import anthropic

        self.sdk = anthropic
        self.model = config.model
        params = dict(config.params)
        if "max_new_tokens" in params:
            params["max_tokens"] = params.pop("max_new_tokens")
        params.setdefault("max_tokens", config.max_tokens)
        if "stop" in params:
            stop = params.pop("stop")
            params["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        params.pop("seed", None)  # not an Anthropic parameter
        self.params = params
        self.tool = _tool(config.structured_output)
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key(config.api_key_env, "Anthropic", config.base_url),
            base_url=config.base_url,
            max_retries=0,
            timeout=config.timeout_s,
        )
        self._create = self.client.messages.with_raw_response.create
        self.wire = None if config.client == "sdk" else Wire(
            self.client, anthropic, "v1/messages", timeout_s=config.timeout_s, connections=config.concurrency_cap)
        # The signature of the typed method (create), not of its raw-response wrapper.
        self._signature = self.client.messages.create

    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        if n != 1:
            raise ValueError("Anthropic has no n; the pipeline sends one request per sample")
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m for m in messages if m["role"] != "system"],
            **self.params,
        }
        if system:
            body["system"] = system
        if self.tool is not None:
            body["tools"] = [self.tool]
            body["tool_choice"] = {"type": "tool", "name": self.tool["name"]}
        return body

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        if self.wire is not None:
            content, headers = await self.wire.post(body)
        else:
            try:
                raw = await self._create(**sdk_call_args(self._signature, body))
            except self.sdk.AnthropicError as exc:
                raise map_sdk_error(exc, self.sdk) from None
            content, headers = await raw.read(), lower_headers(raw.headers)
        return self.parse(parse_json_body(content, "Anthropic"), headers)

    def parse(self, data: dict[str, Any], headers: dict[str, str] | None = None) -> TeacherResponse:
        """A Message as JSON (an online answer, or the message of a Message Batches result)."""
        try:
            calls = [part for part in data["content"] if part.get("type") == "tool_use"]
            if self.tool is not None and calls:  # the forced tool's input is the answer
                text = json.dumps(calls[0]["input"], ensure_ascii=False)
            else:
                text = "".join(part.get("text", "") for part in data["content"] if part.get("type") == "text")
            usage = data.get("usage") or {}
            reason = data.get("stop_reason")
            # Anthropic's input_tokens are those after the last cache breakpoint; the cache reads and writes
            # are counted apart. TeacherResponse.input_tokens is every input token, as OpenAI counts them.
            read = int(usage.get("cache_read_input_tokens") or 0)
            written = int(usage.get("cache_creation_input_tokens") or 0)
            if reason == "tool_use" and self.tool is not None:
                reason = "end_turn"  # calling the forced tool is how a structured answer ends
            return TeacherResponse(
                choices=[Choice(text, STOP_REASONS.get(reason, reason))],
                input_tokens=int(usage.get("input_tokens") or 0) + read + written,
                output_tokens=int(usage.get("output_tokens") or 0),
                cached_input_tokens=read,
                cache_write_tokens=written,
                headers=headers or {},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise TeacherError(f"Anthropic answer has an unexpected shape ({exc!r})", retryable=True) from None

    # ---- Message Batches hooks (factory/batch.py drives them; see factory/teachers/batching.py) ----------
    def batch_entry(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "params": body}

    async def submit_batch(self, path: Path, *, file_id: str | None, tag: str, call: Call,
                           uploaded: Callable[[str], None]) -> str:
        requests = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        created = await call(lambda: self.client.messages.batches.create(requests=requests), once=True)
        return created.id

    async def find_batch(self, *, tag: str, count: int, since: float, call: Call) -> list[str]:
        """Every batch created since then with the same request count: candidates, not certainties.

        A Message Batch keeps no metadata, and neither its requests nor its results can be read before it
        ends (the results endpoint answers 400 until then), so nothing we control is readable earlier; the
        driver confirms a candidate when it has ended, by the custom_id of its first result."""
        candidates = []
        page = await call(lambda: self.client.messages.batches.list(limit=100))
        async for found in page:
            if epoch(found.created_at) < since:
                break
            counts = found.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == count:
                candidates.append(found.id)
        return candidates

    async def batch_status(self, provider_id: str, call: Call) -> BatchState:
        info = await call(lambda: self.client.messages.batches.retrieve(provider_id))
        counts = info.request_counts
        answered = counts.succeeded + counts.errored + counts.canceled + counts.expired
        return BatchState(info.processing_status, info.processing_status == "ended", answered, info)

    def batch_failure(self, state: BatchState) -> str | None:
        return None  # a Message Batch is validated request by request, never refused whole

    async def batch_outcomes(self, state: BatchState, provider_id: str, files: Path, name: str,
                             call: Call) -> AsyncIterator[Outcome]:
        results = await call(lambda: self.client.messages.batches.results(provider_id))
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

    async def aclose(self) -> None:
        if self.wire is not None:
            await self.wire.aclose()
        await self.client.close()


def _tool(structured: StructuredOutput | None) -> dict[str, Any] | None:
    """`teacher.structured_output` as the one tool of every request."""
    if structured is None:
        return None
    return {"name": structured.name, "description": structured.description or f"Record the {structured.name}.",
            "input_schema": structured.json_schema}
