"""The project's fake server (`fakes.FakeServer`), plus a clock on the answers it gives.

    .venv/bin/python benchmarks/peers/fake_server.py --latency 0.2 [--rpm N --tpm N]

Prints "PORT <n>" once listening on 127.0.0.1 and serves until SIGTERM or SIGINT; then prints one JSON
line: total requests, counts by HTTP status, and the server's view of the request phase: how many
chat completions it answered with 200 and the monotonic seconds between the first and the last of
them arriving. The answers are the default ones (`Answer 0: <last user message>`). Requests with no
messages (curator's start-up probe for rate-limit headers) are answered but not timed, so every tool's
request phase is measured the same way, from its first real request to its last.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fakes import FakeConfig, FakeServer, default_responder  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.answered = 0

    def responder(self, messages: list, index: int, body: dict) -> str:
        if messages:
            now = time.monotonic()
            if self.first is None:
                self.first = now
            self.last = now
            self.answered += 1
        return default_responder(messages, index, body)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    args = parser.parse_args()
    clock = Clock()
    config = FakeConfig(latency_s=args.latency, rpm=args.rpm, tpm=args.tpm, max_requests=100_000_000,
                        responder=clock.responder, keep_bodies=1)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = FakeServer(config).start()
    print(f"PORT {server.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()
    snap = server.stats.snapshot()
    span = (clock.last - clock.first) if clock.first is not None else 0.0
    print(json.dumps({"total": snap["total"], "by_status": {str(k): v for k, v in snap["by_status"].items()},
                      "answered": clock.answered, "span_s": span}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
