"""`python -m fakes`: the fake server in a process of its own (see fakes/__init__.py).

    python -m fakes --port 0 --latency 0.2 [--rpm N --tpm N --api-key K --fault 3=429 --fault-rate 500=0.1]

Prints "PORT <n>" once listening on 127.0.0.1, serves until SIGTERM or SIGINT, then prints a one-line
summary on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Callable

from fakes.app import FakeServer
from fakes.common import FakeConfig


def _pairs(values: list[str], key: Callable, value: Callable, flag: str) -> dict:
    out = {}
    for item in values:
        left, sep, right = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} wants KEY=VALUE, got {item!r}")
        try:
            out[key(left.strip())] = value(right.strip())
        except ValueError:
            raise SystemExit(f"{flag}: cannot read {item!r}") from None
    return out


def parse_args(argv: list[str] | None = None) -> FakeConfig:
    parser = argparse.ArgumentParser(
        prog="python -m fakes",
        description="Loopback fake OpenAI + Anthropic server. Prints 'PORT <n>' once listening on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every response")
    parser.add_argument("--capacity", type=int, default=None,
                        help="queue like vLLM: at most N requests served at once, the rest wait their turn")
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--input-tpm", type=int, help="Anthropic input tokens per minute")
    parser.add_argument("--output-tpm", type=int, help="Anthropic output tokens per minute")
    parser.add_argument("--rate-mode", choices=("bucket", "sliding"), default="bucket")
    parser.add_argument("--rate-quantum", type=float, default=None, metavar="S",
                        help="also enforce the limits in fixed windows of S seconds (a quantised per-minute limit)")
    parser.add_argument("--api-key")
    parser.add_argument("--fault", action="append", default=[], metavar="SEQ=KIND",
                        help="e.g. 3=429, 7=drop (repeatable)")
    parser.add_argument("--fault-rate", action="append", default=[], metavar="KIND=P",
                        help="e.g. 500=0.1 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds, for injected 429s")
    parser.add_argument("--slow", type=float, default=5.0, help="extra seconds of a 'slow' fault")
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    return FakeConfig(
        port=args.port, latency_s=args.latency, capacity=args.capacity, api_key=args.api_key, rpm=args.rpm, tpm=args.tpm,
        input_tpm=args.input_tpm, output_tpm=args.output_tpm, rate_mode=args.rate_mode, rate_quantum_s=args.rate_quantum,
        faults=_pairs(args.fault, int, str, "--fault"),
        fault_rates=_pairs(args.fault_rate, str, float, "--fault-rate"),
        seed=args.seed, retry_after=args.retry_after, slow_s=args.slow, max_requests=args.max_requests,
    )


async def _main(config: FakeConfig) -> FakeServer:
    server = FakeServer(config)
    await server.listen()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server._stopped.set)
    print(f"PORT {server.port}", flush=True)
    await server.serve()
    return server


def main(argv: list[str] | None = None) -> int:
    server = asyncio.run(_main(parse_args(argv)))
    snap = server.stats.snapshot()
    print(f"fakeserver: {snap['total']} requests, by status {snap['by_status']}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
