"""What the OpenAI and Anthropic backends share: the API key, the SDK client, error mapping."""
from __future__ import annotations

import json
import os
import sys
from types import ModuleType
from typing import Any, Mapping

import orjson

from apprentice.errors import ApprenticeError, TeacherError
from apprentice.responses import parse_retry_after


class MissingKeyError(ApprenticeError):
    pass


def api_key(env_name: str | None, provider: str, base_url: str | None) -> str:
    key = os.environ.get(env_name or "")
    if key:
        return key
    if base_url:
        # Self-hosted OpenAI-compatible servers (vLLM, llama.cpp, Ollama) usually want no key.
        return "EMPTY"
    raise MissingKeyError(
        f"{env_name} is not set: export it (export {env_name}=...), set teacher.api_key_env to the variable "
        f"that holds your {provider} key, or use provider: local"
    )


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
TIMEOUT_MESSAGE = "timeout: no answer within teacher.timeout_s"


def lower_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers is not None else {}


def map_sdk_error(exc: Exception, sdk: ModuleType) -> TeacherError:
    """Turn an SDK exception into a TeacherError that says whether to retry."""
    if isinstance(exc, sdk.APIStatusError):
        return status_error(exc.status_code, lower_headers(exc.response.headers), exc.message)
    if isinstance(exc, sdk.APITimeoutError):
        return TeacherError(TIMEOUT_MESSAGE, retryable=True)
    if isinstance(exc, sdk.APIConnectionError):
        return TeacherError(f"connection error: {shorten(str(exc.__cause__ or exc))}", retryable=True)
    return TeacherError(f"{type(exc).__name__}: {shorten(str(exc))}", retryable=False)


def status_error(status: int, headers: dict[str, str], message: str) -> TeacherError:
    """An error status (lower-case headers, a wording of it) as a TeacherError."""
    return TeacherError(
        f"HTTP {status}: {shorten(message)}",
        retryable=status in RETRYABLE_STATUS,
        status=status,
        retry_after=parse_retry_after(headers),
        rate_limited=status == 429,
        headers=headers,
    )


def sdk_status_error(client: Any, sdk: ModuleType, url: str, status: int, headers: list[tuple[str, str]],
                     content: bytes) -> TeacherError:
    """An error status that came by another way than the SDK, as the SDK would have raised and map_sdk_error
    mapped it: the SDK words it (each SDK version its own way) from a response of its HTTP library made of
    what the server sent. Only error answers pay for this."""
    try:
        request = client._client.build_request("POST", url)
        response = sys.modules[type(request).__module__].Response(status, headers=headers, content=content,
                                                                   request=request)
        return map_sdk_error(client._make_status_error_from_response(response), sdk)
    except Exception:  # noqa: BLE001 - an SDK that no longer has these internals: the status, in our words
        return status_error(status, lower_headers(dict(headers)), content.decode("utf-8", "replace"))


def sdk_call_args(method: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The body as keyword arguments for an SDK method: keys the method does not declare (sampling
    parameters that a newer SDK dropped from its signature, provider extensions such as vLLM's
    `top_k`) travel in `extra_body`, so the JSON on the wire is the body the cache keyed on."""
    known = _known_params(method)
    kwargs = {key: value for key, value in body.items() if key in known}
    extra = {key: value for key, value in body.items() if key not in known}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


_KNOWN: dict[Any, frozenset[str]] = {}


def _known_params(method: Any) -> frozenset[str]:
    key = getattr(method, "__func__", method)
    known = _KNOWN.get(key)
    if known is None:
        import inspect

        known = _KNOWN[key] = frozenset(inspect.signature(method).parameters) - {"extra_body"}
    return known


def shorten(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def parse_json_body(content: bytes, provider: str) -> Mapping[str, Any]:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        try:  # what json reads and orjson refuses: NaN, Infinity, integers beyond 64 bits
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeacherError(
                f"{provider} answered 200 with a body that is not JSON: "
                f"{shorten(content[:200].decode('utf-8', 'replace'))}",
                retryable=True,
            ) from None
    if not isinstance(data, dict):
        raise TeacherError(f"{provider} answered 200 with JSON that is not an object", retryable=True)
    return data

