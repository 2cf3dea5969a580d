"""OpenAI chat completions, and any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama) via base_url."""
from __future__ import annotations

from typing import Any

from ..recipe import TeacherConfig
from .base import Choice, TeacherError, TeacherResponse
from .hosted import api_key, sdk_call_args, lower_headers, map_sdk_error, parse_json_body


class OpenAITeacher:
    provider = "openai"
    supports_n = True
    max_useful_concurrency = None

    def __init__(self, config: TeacherConfig) -> None:
        import openai

        self._sdk = openai
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
        # The signature of the typed method (create), not of its raw-response wrapper.
        self._signature = self.client.chat.completions.create

    def build_request(self, messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.params}
        if n > 1:
            body["n"] = n
        return body

    async def complete(self, body: dict[str, Any]) -> TeacherResponse:
        try:
            raw = await self._create(**sdk_call_args(self._signature, body))
        except self._sdk.OpenAIError as exc:
            raise map_sdk_error(exc, self._sdk) from None
        # Read the JSON directly: building the SDK's pydantic objects costs more CPU than the rest.
        data = parse_json_body(raw.content, "OpenAI")
        try:
            choices = [
                Choice((item["message"].get("content") or ""), item.get("finish_reason"))
                for item in sorted(data["choices"], key=lambda c: c.get("index", 0))
            ]
            usage = data.get("usage") or {}
            return TeacherResponse(
                choices=choices,
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                headers=lower_headers(raw.headers),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise TeacherError(f"OpenAI answer has an unexpected shape ({exc!r})", retryable=True) from None

    async def aclose(self) -> None:
        await self.client.close()
