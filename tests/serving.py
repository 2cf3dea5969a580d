"""Test helpers for the serve router: a router on its own thread and event loop (so that the sync openai SDK can
call it from the test's thread), and serve configs whose backends are loopback fake servers."""
from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

from helpers import API_KEY

from fakes import FakeConfig, FakeServer
from serve.app import ServeApp
from serve.config import ServeConfig

KEY_ENV = "APPRENTICE_TEST_KEY"  # the fakes' key (tests/helpers.py API_KEY)


@contextmanager
def student_and_teacher(student_answer: str = "Paris", teacher_answer: str = "Paris.") -> Iterator[
        tuple[FakeServer, FakeServer]]:
    """A student and a teacher, each a fake OpenAI server with its own answer (their key: API_KEY in KEY_ENV)."""
    student = FakeServer(FakeConfig(api_key=API_KEY, responder=lambda messages, i, body: student_answer))
    teacher = FakeServer(FakeConfig(api_key=API_KEY, responder=lambda messages, i, body: teacher_answer))
    student.start()
    teacher.start()
    try:
        yield student, teacher
    finally:
        student.stop()
        teacher.stop()


def backend(url: str, model: str, **extra: Any) -> dict[str, Any]:
    """A backend that is a fake OpenAI server: no retries, so that a fault falls back at once."""
    return {"provider": "openai", "model": model, "base_url": url, "api_key_env": KEY_ENV, "max_retries": 0,
            "params": {"temperature": 0.0, "max_tokens": 64}, **extra}


def serve_config(log_dir: Any, student_url: str, teacher_url: str | None = None, **extra: Any) -> ServeConfig:
    data: dict[str, Any] = {"port": 0, "log_dir": str(log_dir), "student": backend(student_url, "student"),
                            "routing": {"mode": "student"}}
    if teacher_url is not None:
        data["teacher"] = backend(teacher_url, "teacher")
    data.update(extra)
    return ServeConfig.model_validate(data)


class LoopThread:
    """An event loop on its own thread, for servers that the test's thread calls (`call` runs a coroutine there)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __enter__(self) -> "LoopThread":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RunningRouter(LoopThread):
    """`with RunningRouter(config) as router:` serves on 127.0.0.1 from a thread; `router.base_url` for the SDK."""

    def __init__(self, config: ServeConfig, seed: int = 0) -> None:
        super().__init__()
        self.warnings: list[str] = []
        self.app = ServeApp(config, self.warnings.append, rng=random.Random(seed))

    def __enter__(self) -> "RunningRouter":
        super().__enter__()
        try:
            host, port = self.call(self.app.start())
        except BaseException:
            self.call(self.app.stop())
            super().__exit__()
            raise
        self.url = f"http://{host}:{port}"
        self.base_url = f"{self.url}/v1"
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.call(self.app.stop())
        finally:
            super().__exit__(*exc)

    @property
    def router(self) -> Any:
        return self.app.router


class Reply:
    def __init__(self, status: int, text: str) -> None:
        self.status_code = status
        self.text = text

    def json(self) -> Any:
        return json.loads(self.text)


def http(method: str, url: str, *, json_body: Any = None, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> Reply:
    """One plain HTTP request (urllib): the status and the text, errors included."""
    data = content if content is not None else (json.dumps(json_body).encode() if json_body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read().decode("utf-8"))
