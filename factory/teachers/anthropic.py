"""Anthropic Messages API. It has no `n`: the pipeline sends one request per sample."""
from __future__ import annotations

from typing import Any

from ..recipe import TeacherConfig
from .base import Choice, TeacherError, TeacherResponse
from .hosted import api_key, sdk_call_args, lower_headers, map_sdk_error, parse_json_body


# Anthropic's stop reasons in the OpenAI vocabulary the checks use; others (refusal, tool_use) pass as they are.
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


class AnthropicTeacher:
    provider = "anthropic"
    supports_n = False
    max_useful_concurrency = None

    def __init__(self, config: TeacherConfig) -> None:
        import anthropic

        self._sdk = anthropic
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
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key(config.api_key_env, "Anthropic", config.base_url),
            base_url=config.base_url,
            max_retries=0,
            timeout=config.timeout_s,
        )
        self._create = self.client.messages.with_raw_response.create
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
        return body

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        try:
            raw = await self._create(**sdk_call_args(self._signature, body))
        except self._sdk.AnthropicError as exc:
            raise map_sdk_error(exc, self._sdk) from None
        return self.parse(parse_json_body(await raw.read(), "Anthropic"), lower_headers(raw.headers))

    def parse(self, data: dict[str, Any], headers: dict[str, str] | None = None) -> TeacherResponse:
        """A Message as JSON (an online answer, or the message of a Message Batches result)."""
        try:
            text = "".join(part.get("text", "") for part in data["content"] if part.get("type") == "text")
            usage = data.get("usage") or {}
            reason = data.get("stop_reason")
            return TeacherResponse(
                choices=[Choice(text, STOP_REASONS.get(reason, reason))],
                input_tokens=int(usage.get("input_tokens") or 0),
                output_tokens=int(usage.get("output_tokens") or 0),
                headers=headers or {},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise TeacherError(f"Anthropic answer has an unexpected shape ({exc!r})", retryable=True) from None

    async def aclose(self) -> None:
        await self.client.close()
