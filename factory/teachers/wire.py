"""The lean request path (`teacher.client: raw`, the default for the hosted teachers).

Per request, the SDKs build typed options, transform every parameter and wrap the answer in objects: on a
loopback server that is 2–5 ms of CPU, more than all the rest of the factory, and the CPU bounds a run's speed
(benchmarks/factory_overhead.py). Here one aiohttp session per teacher, its pool sized to the teacher's
max_concurrency, posts the body as orjson bytes and hands back the answer's bytes and headers. The router
(serve/) asks for a smaller HTTP/1.1 client on asyncio's transports (factory/teachers/http1.py) for its plain
`http://` backends (`prefer_http1`); the factory stays on aiohttp's.

What the SDK decides is read from the SDK client the teacher builds anyway (the Batch APIs use it): the URL
(`base_url` as the SDK resolves it, from the recipe or its environment variable) and the headers (the API key,
organisation, project, API version). So both paths send the same request to the same place. An error status
is worded by the SDK itself and becomes the TeacherError that `hosted.map_sdk_error` makes of the SDK's; so do
a timeout and a dropped connection (whose message ends with aiohttp's words for it instead of httpx's).

`stream` posts a streamed request (`stream: true`) on aiohttp's client (the small HTTP/1.1 client reads whole
answers only) and yields each server-sent event's JSON as it arrives: the serve router passes an answer on
token by token. An error event (`data: {"error": …}`) or a stream that ends before its `[DONE]` is a
retryable TeacherError; whether it may still be retried is the caller's to say (nothing passed on yet).
"""
from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import aiohttp
import orjson

from apprentice.errors import TeacherError

from .hosted import TIMEOUT_MESSAGE, sdk_status_error, shorten
from .http1 import Http1Pool


class Wire:
    """POST JSON to one endpoint of the provider; the answer's bytes and lower-case headers, or TeacherError."""

    def __init__(self, client: Any, sdk: ModuleType, path: str, *, timeout_s: float, connections: int) -> None:
        self.client, self.sdk = client, sdk
        self.url = f"{str(client.base_url).rstrip('/')}/{path}"
        # Omitted headers (no organisation set, ...) are SDK sentinels, not strings.
        self.headers = {key: value for key, value in {**client.default_headers, **client.auth_headers}.items()
                        if isinstance(value, str)}
        # The SDK's timeout applies to each phase (connect, each read); so does this one.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        self.connections = connections
        # A proxy from the environment, as the SDK's HTTP client honours it; looked up once, not per request.
        scheme, _, rest = self.url.partition("://")
        host = rest.split("/", 1)[0].rsplit(":", 1)[0]
        proxies = urllib.request.getproxies()
        self.proxy = None if urllib.request.proxy_bypass(host) else proxies.get(scheme) or proxies.get("all")
        self.session: aiohttp.ClientSession | None = None
        self.pool: Http1Pool | None = None
        self._http1 = (scheme == "http" and self.proxy is None, connections, timeout_s)

    def prefer_http1(self) -> bool:
        """Post on the small HTTP/1.1 client (factory/teachers/http1.py) where the endpoint is plain `http://`
        with no proxy: the router's hop to its own backends (serve/), where its CPU per request counts most.
        Everything else stays on aiohttp's maintained client. True when it applies."""
        eligible, connections, timeout_s = self._http1
        if eligible and self.pool is None:
            self.pool = Http1Pool(self.url, self.headers, connections=connections, timeout_s=timeout_s)
        return self.pool is not None

    async def post(self, body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        if self.pool is not None:
            return await self._post_http1(self.pool, body)
        session = self.session or self._open()
        try:
            async with session.post(self.url, data=encode(body), proxy=self.proxy) as response:
                content = await response.read()
                status = response.status
                if not 200 <= status < 300:
                    raise sdk_status_error(self.client, self.sdk, self.url, status,
                                           list(response.headers.items()), content)
                headers = {key.lower(): value for key, value in response.headers.items()}
        except asyncio.TimeoutError:  # before ClientError: aiohttp's timeouts are both
            raise TeacherError(TIMEOUT_MESSAGE, retryable=True) from None
        except aiohttp.ClientError as exc:
            raise TeacherError(f"connection error: {shorten(str(exc) or type(exc).__name__)}",
                               retryable=True) from None
        return content, headers

    async def _post_http1(self, pool: Http1Pool, body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        try:
            reply = await pool.post(encode(body))
        except asyncio.TimeoutError:
            raise TeacherError(TIMEOUT_MESSAGE, retryable=True) from None
        except OSError as exc:  # refused, reset, closed halfway, not HTTP
            raise TeacherError(f"connection error: {shorten(str(exc) or type(exc).__name__)}",
                               retryable=True) from None
        if not 200 <= reply.status < 300:
            raise sdk_status_error(self.client, self.sdk, self.url, reply.status, reply.headers, reply.content)
        return reply.content, {key.lower(): value for key, value in reply.headers}

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The events of a streamed answer, as they arrive (a generator: close it to stop reading)."""
        session = self.session or self._open()
        try:
            async with session.post(self.url, data=encode(body), proxy=self.proxy) as response:
                if not 200 <= response.status < 300:
                    content = await response.read()
                    raise sdk_status_error(self.client, self.sdk, self.url, response.status,
                                           list(response.headers.items()), content)
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield _event(data)
        except asyncio.TimeoutError:
            raise TeacherError(TIMEOUT_MESSAGE, retryable=True) from None
        except aiohttp.ClientError as exc:
            raise TeacherError(f"connection error: {shorten(str(exc) or type(exc).__name__)}",
                               retryable=True) from None
        raise TeacherError("connection error: the stream ended before its [DONE]", retryable=True)

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on the first request: aiohttp binds it to the running event loop."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections), headers=self.headers, timeout=self.timeout,
        )
        return self.session

    async def aclose(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.session is not None:
            await self.session.close()
            self.session = None


def _event(data: bytes) -> dict[str, Any]:
    """One event's JSON; an error event is the TeacherError it reports."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise TeacherError(f"the stream sent an event that is not JSON: {shorten(data.decode('utf-8', 'replace'))}",
                           retryable=True) from None
    if not isinstance(event, dict):
        raise TeacherError("the stream sent an event that is not a JSON object", retryable=True)
    error = event.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        raise TeacherError(f"the stream ended with an error: {shorten(str(message))}", retryable=True)
    return event


def encode(body: dict[str, Any]) -> bytes:
    """The body as JSON bytes: the same value the cache keyed on (`canonical_json(body)`), in any key order."""
    try:
        # Keys that are not strings (a YAML `logit_bias: {50256: -100}`) become strings, as json.dumps makes them.
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # an integer beyond 64 bits, which orjson refuses
        return json.dumps(body).encode()
