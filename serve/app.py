"""The HTTP side: the OpenAI chat-completions API on aiohttp, who may call it, and the server's own endpoints.

    POST /v1/chat/completions   non-streaming or streaming (SSE: passed on token by token where the route is
                                known before the answer, serve/router.py), `n`, `usage`, `stream_options.include_usage`
    GET  /v1/models             the one model name this server answers as (`serve.model`)
    GET  /metrics               Prometheus text (serve/metrics.py)
    GET  /health                200 while no alarm is on, 503 with the alarms otherwise (no key needed)
    POST /admin/reload          load the student again (optionally `{"model": PATH}`: a new folder), no restart

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request, 401 for a
missing or wrong key, 413 for a body over `serve.max_body_bytes`, 503 when neither model answers; a stream
that breaks after some text was sent ends with OpenAI's error event instead of [DONE]. Keys are
compared in constant time (`hmac.compare_digest`) and never written anywhere: not to the served log, the
metrics, an error message or an access log (there is none).
"""
from __future__ import annotations

import asyncio
import hmac
import os
import random
import time
from typing import Any, Callable

import aiohttp
import orjson
from aiohttp import web

from apprentice.errors import ApprenticeError, RecipeError
from factory.served_log import ServedLog

from .backends import Backend, StreamBroken
from .config import ServeConfig
from .judge import ShadowJudge
from .learned import LearnedRouter
from .metrics import Metrics
from .router import AllDown, ChatRequest, Opening, Router, Served

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", None: "stop"}
OPEN_PATHS = ("/health",)


class BadRequest(ApprenticeError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # orjson: on every response, cheaper than json.dumps
    return web.Response(body=orjson.dumps(body), status=status, headers=headers, content_type="application/json")


def error_response(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> web.Response:
    return json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def read_keys(env_name: str | None, key: str) -> list[bytes] | None:
    """The keys in `$env_name` (comma-separated), or None when the recipe names no variable."""
    if env_name is None:
        return None
    keys = [item.strip().encode("utf-8") for item in os.environ.get(env_name, "").split(",") if item.strip()]
    if not keys:
        raise RecipeError(f"serve.{key}: ${env_name} is not set or empty: export it (one or more keys, "
                          f"comma-separated), or remove serve.{key}")
    return keys


def key_matches(header: str | None, keys: list[bytes]) -> bool:
    """`Authorization: Bearer KEY` against every key, each compared in constant time (no early exit)."""
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def parse_chat(body: Any, config: ServeConfig) -> tuple[ChatRequest, bool, bool]:
    """(the request, stream?, include usage in the stream?) or BadRequest naming the parameter."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        parsed.append({"role": ROLES[message["role"]], "content": content})
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= config.max_n:
        raise BadRequest(f"n must be an integer from 1 to {config.max_n}", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer", "max_tokens")
        if max_tokens > config.max_tokens:
            raise BadRequest(f"max_tokens {max_tokens} is over this server's limit of {config.max_tokens}",
                             "max_tokens")
    sampling = {}
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= high:
            raise BadRequest(f"{name} must be a number from 0 to {high}", name)
        sampling[name] = value
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    if body.get("tools") or body.get("functions"):
        raise BadRequest("tools are not supported by this server", "tools")
    return ChatRequest(parsed, n, max_tokens, sampling), stream, bool(options.get("include_usage"))


class ServeApp:
    """The server: built from the config, started on an event loop, stopped cleanly."""

    def __init__(self, config: ServeConfig, warn: Callable[[str], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.warn = warn or (lambda message: None)
        self.api_keys = read_keys(config.api_keys_env, "api_keys_env")
        self.admin_keys = read_keys(config.admin_key_env, "admin_key_env")
        self.metrics = Metrics(config.alarm, self._alarm)
        self.rng = rng
        self.runner: web.AppRunner | None = None
        self.router: Router | None = None
        self._background: set[asyncio.Task] = set()  # replaced students closing, webhook posts
        self._http: aiohttp.ClientSession | None = None  # the alarm's webhook, vLLM's adapter loading

    def _alarm(self, kind: str, reason: str, on: bool) -> None:
        self.warn(f"ALARM: {reason}" if on else f"alarm cleared: {reason}")
        if self.config.alarm.webhook is not None:
            task = asyncio.get_running_loop().create_task(self._notify(
                {"alarm": kind, "on": on, "reason": reason, "model": self.config.model}))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _notify(self, payload: dict[str, Any]) -> None:
        """POST the alarm to `alarm.webhook`, off the response path; a failure is a log line, not an error."""
        url = self.config.alarm.webhook
        assert url is not None
        try:
            async with self._session().post(url, data=orjson.dumps(payload),
                                            headers={"Content-Type": "application/json"}) as response:
                if response.status >= 400:
                    self.warn(f"alarm webhook: {url} answered {response.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.warn(f"alarm webhook: {url}: {type(exc).__name__} {exc}".rstrip())

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/health", self.health)
        app.router.add_post("/admin/reload", self.reload)
        return app

    async def start(self) -> tuple[str, int]:
        """Build the backends and the log, bind; returns the address actually bound (port 0: a free one)."""
        config = self.config
        assert config.routing.router is not None  # the config fills it in
        learned = LearnedRouter.load(config.routing.router) if config.routing.mode == "learned" else None
        if learned is not None and learned.embedding != config.routing.embedding:
            self.warn(f"routing.embedding is {config.routing.embedding}, but {config.routing.router} was fitted with "
                      f"{learned.embedding}: serving with {learned.embedding} (--fit-router refits with the recipe's)")
        # the judge first: its price is what a recipe most likely lacks (a budget needs one)
        judge = ShadowJudge(config.shadow_judge) if config.shadow_judge is not None else None
        student = Backend("student", config.student)
        teacher = Backend("teacher", config.teacher, config.budget_usd) if config.teacher is not None else None
        log = ServedLog(config.log_dir, config.log_rotate_bytes)
        if log.repaired:
            self.warn(f"served log: cut a partial last line ({log.repaired} bytes) left by a crash in {log.path}")
        self.router = Router(config, student, teacher, log, self.metrics, self.rng, self.warn, learned, judge)
        self.runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, config.host, config.port)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return host, port

    async def stop(self) -> None:
        """Stop listening, let the shadow comparisons and background posts finish, close the backends and the log
        (a second call does nothing)."""
        runner, router, self.runner, self.router = self.runner, self.router, None, None
        if runner is not None:
            await runner.cleanup()
        if router is not None:
            await router.drain()
            await asyncio.gather(*self._background, return_exceptions=True)
            for backend in (router.student, router.teacher, router.judge):
                if backend is not None:
                    await backend.aclose()
            router.log.close()
            if router.learned is not None:
                router.learned.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self._http

    # ---- who may call ----------------------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = self._refusal(request)
        if response is None:
            try:
                response = await handler(request)
            except web.HTTPRequestEntityTooLarge:
                response = error_response(413, f"the request body is over this server's limit of "
                                          f"{self.config.max_body_bytes} bytes", code="request_too_large")
            except web.HTTPException as exc:
                response = error_response(exc.status, exc.reason, code=None)
        if response.status >= 400:
            self.metrics.error(response.status)
        return response

    def _refusal(self, request: web.Request) -> web.Response | None:
        if request.path in OPEN_PATHS:
            return None
        if request.path.startswith("/admin/"):
            if self.admin_keys is None:
                return error_response(403, "the admin endpoints are off: set serve.admin_key_env", code="admin_off")
            keys = self.admin_keys
        elif self.api_keys is None:
            return None
        else:
            keys = self.api_keys
        if key_matches(request.headers.get("Authorization"), keys):
            return None
        return error_response(401, "Incorrect API key provided. Send one of the server's keys as "
                              "`Authorization: Bearer KEY`.", code="invalid_api_key")

    # ---- the API ---------------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        assert self.router is not None
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return error_response(400, f"the body is not valid JSON: {exc}")
        try:
            chat, stream, include_usage = parse_chat(body, self.config)
        except BadRequest as exc:
            return error_response(400, str(exc), param=exc.param)
        events = EventStream(request, self.config.model, include_usage) if stream else None
        try:
            if events is None:
                served = await self.router.complete(chat)
            else:
                served = await self.router.stream(chat, events.text)
        except AllDown as exc:  # the details (backend addresses, their errors) are for the operator, not the client
            self.warn(f"503: {exc}")
            return error_response(503, "no model could answer this request; try again later", kind="server_error",
                                  code="models_down")
        except StreamBroken as exc:  # logged with its fault; the client has part of the answer
            self.warn(f"stream broken: {exc}")
            assert events is not None and events.response is not None
            await events.error("the model's answer broke off; try again", "stream_broken")
            return events.response
        except OSError as exc:  # the served log could not be written: the request is not answered unlogged
            self.warn(f"served log: {exc}")
            message = "the server could not log the request; it was not answered"
            if events is not None and events.response is not None:  # some text is out: the stream ends unfinished
                await events.error(message, "log_failed")
                return events.response
            return error_response(500, message, kind="server_error", code="log_failed")
        if events is not None:
            return await events.finish(served, self._usage(served))
        return json_response(self._completion(served), headers=served_headers(served.answered_by, served.route,
                                                                              served.fault))

    def _usage(self, served: Served) -> dict[str, int]:
        prompt, completion = served.answer.usage.get("input_tokens", 0), served.answer.usage.get("output_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, served: Served) -> dict[str, Any]:
        answer = served.answer
        return {
            "id": f"chatcmpl-{served.id}", "object": "chat.completion", "created": int(time.time()),
            "model": self.config.model, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": FINISH.get(reason, reason)}
                        for i, (text, reason) in enumerate(zip(answer.texts, answer.finish_reasons))],
            "usage": self._usage(served),
        }

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [
            {"id": self.config.model, "object": "model", "created": 0, "owned_by": "apprentice"}]})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def health(self, request: web.Request) -> web.Response:
        alarms = sorted(self.metrics.alarms.values())
        body = {"status": "alarm" if alarms else "ok", "alarms": alarms,
                "rolling_agreement": self.metrics.rolling_agreement(),
                "rolling_confidence": self.metrics.rolling_confidence(),
                "rolling_judge_preference": self.metrics.rolling_preference()}
        return json_response(body, status=503 if alarms else 200)

    # ---- admin -----------------------------------------------------------------------------------------------
    async def reload(self, request: web.Request) -> web.Response:
        """A new student backend (the same config, or another model folder), warmed with one short answer before
        it takes traffic; the old one finishes its requests, then closes. A student that fails to load is not
        swapped in: the old one keeps serving."""
        assert self.router is not None
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            return error_response(400, f"the body is not valid JSON: {exc}")
        body = body if isinstance(body, dict) else {}
        model, lora_path = body.get("model"), body.get("lora_path")
        if model is not None and not isinstance(model, str):
            return error_response(400, "model must be a string (a model folder or id)", param="model")
        if lora_path is not None and (not isinstance(lora_path, str) or not model):
            return error_response(400, "lora_path (the adapter's folder on the vLLM server) needs model: the name "
                                  "to serve it as", param="lora_path")
        config = self.config.student.model_copy(update={"model": model}) if model else self.config.student
        if lora_path is not None and (config.provider != "openai" or not isinstance(config.base_url, str)):
            return error_response(400, "lora_path is for a student served by vLLM (provider openai with one "
                                  "base_url, the server started with --enable-lora)", param="lora_path")
        fresh = None
        try:
            if lora_path is not None:
                await self._load_lora(config, lora_path)
            fresh = Backend("student", config)
            await fresh.warm()
        except (ApprenticeError, OSError, ValueError) as exc:
            if fresh is not None:
                await fresh.aclose()
            return error_response(500, f"the new student did not answer; the old one keeps serving: {exc}",
                                  kind="server_error", code="reload_failed")
        old, self.router.student = self.router.student, fresh
        self.config.student = config
        task = asyncio.get_running_loop().create_task(_retire(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self.warn(f"student reloaded: {config.model}")
        return json_response({"reloaded": True, "model": config.model})


    async def _load_lora(self, config: Any, lora_path: str) -> None:
        """vLLM's dynamic LoRA loading (`POST /v1/load_lora_adapter`; the server needs
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): the adapter at `lora_path` becomes the model `config.model`."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(config.api_key_env or "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{config.base_url.rstrip('/')}/load_lora_adapter"
        try:
            async with self._session().post(url, headers=headers, data=orjson.dumps(
                    {"lora_name": config.model, "lora_path": lora_path})) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ApprenticeError(f"{url}: {type(exc).__name__} {exc}".rstrip()) from None
        if response.status != 200:
            raise ApprenticeError(f"{url} answered {response.status}: {text[:300]}")


def served_headers(answered_by: str, route: str, fault: str | None) -> dict[str, str]:
    headers = {"x-apprentice-model": answered_by, "x-apprentice-route": route}
    if fault:
        headers["x-apprentice-fault"] = fault.split(":", 1)[0]
    return headers


class EventStream:
    """A streamed answer in OpenAI's chunks (role, content, finish per choice; a usage chunk when asked; [DONE]).
    It opens at the first text a backend passes on (its headers then name who answers), or at the end with the
    whole answer. A client that goes away stops the writing, not the answer: it is still read and logged."""

    def __init__(self, request: web.Request, model: str, include_usage: bool) -> None:
        self.request = request
        self.include_usage = include_usage
        self.response: web.StreamResponse | None = None
        self.base: dict[str, Any] = {}
        self.model = model
        self.sent: dict[int, int] = {}  # choice → characters of its text sent
        self.gone = False

    async def _open(self, opening: Opening) -> None:
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            **served_headers(opening.answered_by, opening.route, opening.fault)})
        self.base = {"id": f"chatcmpl-{opening.id}", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": self.model, "system_fingerprint": None}
        try:
            await self.response.prepare(self.request)
        except ConnectionError:
            self.gone = True

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {**self.base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _content(self, index: int, text: str) -> bytes:
        head = b"" if index in self.sent else self._chunk(index, {"role": "assistant", "content": ""})
        self.sent[index] = self.sent.get(index, 0) + len(text)
        return head + (self._chunk(index, {"content": text}) if text else b"")

    async def _write(self, data: bytes) -> None:
        if self.gone or self.response is None:
            return
        try:
            await self.response.write(data)
        except ConnectionError:  # the client went away: the answer is still read to its end and logged
            self.gone = True

    async def text(self, opening: Opening, index: int, text: str) -> None:
        """A backend's text as it arrives."""
        if self.response is None:
            await self._open(opening)
        await self._write(self._content(index, text))

    async def finish(self, served: Served, usage: dict[str, int]) -> web.StreamResponse:
        """The rest (all of it for an answer that came whole), each choice's finish, the usage, [DONE]: sent
        after the answer is logged."""
        if self.response is None:
            await self._open(Opening(served.id, served.answered_by, served.route, served.fault))
        answer, payload = served.answer, []
        for index, (text, reason) in enumerate(zip(answer.texts, answer.finish_reasons)):
            payload.append(self._content(index, text[self.sent.get(index, 0):]))
            payload.append(self._chunk(index, {}, FINISH.get(reason, reason)))
        if self.include_usage:
            payload.append(b"data: " + orjson.dumps({**self.base, "choices": [], "usage": usage}) + b"\n\n")
        await self._write(b"".join(payload) + b"data: [DONE]\n\n")
        return await self._end()

    async def error(self, message: str, code: str) -> None:
        """OpenAI's error event, in place of the rest: the SDKs raise it; no [DONE] follows."""
        error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        await self._write(b"data: " + orjson.dumps(error) + b"\n\n")
        await self._end()

    async def _end(self) -> web.StreamResponse:
        assert self.response is not None
        if not self.gone:
            try:
                await self.response.write_eof()
            except ConnectionError:
                self.gone = True
        return self.response


async def _retire(backend: Backend) -> None:
    """Close a replaced backend once the requests it was answering are done."""
    while backend.limiter.in_flight:
        await asyncio.sleep(0.05)
    await backend.aclose()
