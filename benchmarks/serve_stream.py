"""Time to the first token of a streamed answer: the fake backend called directly, through the router where the
route is known before the answer (mode student: passed on as it arrives), and through the router in cascade (the
student's whole answer first), side by side, requests alternating.

    .venv/bin/python benchmarks/serve_stream.py                        # 30 requests each, 64 chunks 5 ms apart
    .venv/bin/python benchmarks/serve_stream.py --requests 50 --chunk-ms 10

The backend is the loopback fake (`fakes.FakeServer`, `stream_chunk_s` between two chunks), the routers are
`serve.app.ServeApp` on their own event loop threads, the client is the real openai SDK (sync), one request at a
time. Each request records the time to its first content chunk and to its end. No torch is involved.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fakes import FakeConfig, FakeServer  # noqa: E402
from serve.app import ServeApp  # noqa: E402
from serve.config import ServeConfig  # noqa: E402

KEY_ENV = "BENCH_STREAM_KEY"


class Served:
    """A ServeApp on its own event loop thread."""

    def __init__(self, config: ServeConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app = ServeApp(config)

    def __enter__(self) -> str:
        self.thread.start()
        host, port = asyncio.run_coroutine_threadsafe(self.app.start(), self.loop).result(30)
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.app.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def config(log_dir: str, url: str, routing: dict) -> ServeConfig:
    backend = {"provider": "openai", "model": "student", "base_url": url, "api_key_env": KEY_ENV,
               "params": {"temperature": 0.0, "max_tokens": 512}}
    return ServeConfig.model_validate({"port": 0, "log_dir": log_dir, "student": backend,
                                       "teacher": {**backend, "model": "teacher"}, "routing": routing})


def one(client: openai.OpenAI) -> tuple[float, float]:
    """(seconds to the first content chunk, seconds to the end) of one streamed request."""
    start = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}],
                                                stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--chunks", type=int, default=64, help="content chunks per answer (4 characters each)")
    parser.add_argument("--chunk-ms", type=float, default=5.0, help="the fake's pause between two chunks")
    args = parser.parse_args()
    os.environ[KEY_ENV] = "none"
    text = "abcd" * args.chunks
    fake = FakeServer(FakeConfig(responder=lambda messages, i, body: text, stream_chunk_s=args.chunk_ms / 1000))
    fake.start()
    times: dict[str, list[tuple[float, float]]] = {"direct": [], "routed, streamed (mode student)": [],
                                                   "routed, buffered (cascade)": []}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp, \
            Served(config(f"{tmp}/a", fake.openai_base_url, {"mode": "student"})) as streamed, \
            Served(config(f"{tmp}/b", fake.openai_base_url, {"mode": "cascade", "threshold": -100.0})) as buffered:
        clients = {name: openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
                   for name, url in zip(times, (fake.openai_base_url, streamed, buffered))}
        for name, client in clients.items():  # warm-up, not counted
            one(client)
        for i in range(args.requests):
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                times[name].append(one(clients[name]))
            load.append(os.getloadavg()[0])
    fake.stop()
    direct_first = statistics.median(first for first, _ in times["direct"])
    print(f"# {args.requests} requests per path, {args.chunks} chunks {args.chunk_ms:g} ms apart; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {min(load):.2f}–{max(load):.2f}")
    print("| path | p50 first token | p50 whole answer | first token ÷ direct |")
    print("|---|---|---|---|")
    for name, pairs in times.items():
        first = statistics.median(f for f, _ in pairs)
        whole = statistics.median(w for _, w in pairs)
        print(f"| {name} | {first * 1000:.1f} ms | {whole * 1000:.1f} ms | {first / direct_first:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
