"""The fake server assembled: the chat endpoints (fakes/server.py) with the batch APIs (fakes/batch.py).

Neither half imports the other; this module composes them, handing the chat server its batch routes.
"""
from __future__ import annotations

from typing import Any

from fakes.batch import FakeBatches
from fakes.common import FakeConfig
from fakes.server import ChatServer


class FakeServer(ChatServer):
    """The fake: OpenAI chat-completions, Anthropic Messages and both Batch APIs on one loopback port.

    `FakeServer(FakeConfig(...))` or `FakeServer(latency_s=..., rpm=...)`. Threaded: `start()` / `stop()`
    or `with FakeServer(...) as server:`. In a running loop: `await listen()` / `await aclose()`,
    `async with`, or `await serve()` (until stopped).
    """

    def __init__(self, config: FakeConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.batches: FakeBatches = FakeBatches(self)
