"""What one request costs the process that sends it, on each of the lean path's two HTTP clients: `Wire` posting
through aiohttp's pooled session (what `https://` and proxied endpoints use) and through its own HTTP/1.1 client
(factory/teachers/http1.py, what the router uses for a plain `http://` backend). Same Wire, same bodies, same fake server,
rounds alternating, in one process.

    .venv/bin/python benchmarks/http_client.py                           # 64 in flight, 3,000 requests a round
    .venv/bin/python benchmarks/http_client.py --rounds 5 --cpus 0       # the client pinned to one core

CPU is this process's (time.process_time) over a round; the fake server runs in its own process
(`python -m fakes`, latency 0), so its work is not counted.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.teachers.wire import Wire  # after the path is set

BODY = {"model": "student", "messages": [{"role": "user", "content": "question number 1"}], "max_tokens": 64,
        "temperature": 0.0}


async def one_round(wire: Wire, count: int, connections: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `count` requests, `connections` in flight."""
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            await wire.post(BODY)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def measure(base_url: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=base_url)
    wires = {"aiohttp": Wire(client, openai, "chat/completions", timeout_s=60, connections=args.connections),
             "http1": Wire(client, openai, "chat/completions", timeout_s=60, connections=args.connections)}
    assert wires["http1"].prefer_http1()  # the router's choice; the other stays on aiohttp's session
    for wire in wires.values():  # warm-up: connections opened, code paths run once
        await one_round(wire, min(500, args.requests), args.connections)
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in wires}
    for round_ in range(args.rounds):
        order = list(wires) if round_ % 2 == 0 else list(reversed(wires))
        for name in order:
            rows[name].append(await one_round(wires[name], args.requests, args.connections))
    for wire in wires.values():
        await wire.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", default=None, help="taskset -c list for the client process, e.g. 0")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})
    fake = subprocess.Popen([sys.executable, "-m", "fakes", "--latency", "0", "--api-key", "sk-bench"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        port = int(fake.stdout.readline().split()[1])  # type: ignore[union-attr]
        rows = asyncio.run(measure(f"http://127.0.0.1:{port}/v1", args))
    finally:
        fake.terminate()
        fake.wait(30)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"command: {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}")
    print()
    print("| client | CPU µs per request (median of rounds) | requests/s (median) | per round CPU µs |")
    print("|---|---|---|---|")
    medians = {}
    for name, results in rows.items():
        per_request = [1e6 * cpu / args.requests for cpu, _ in results]
        medians[name] = statistics.median(per_request)
        rate = statistics.median(args.requests / wall for _, wall in results)
        print(f"| {name} | {medians[name]:.0f} | {rate:.0f} | {', '.join(f'{value:.0f}' for value in per_request)} |")
    print()
    print(f"http1 ÷ aiohttp CPU per request: {medians['http1'] / medians['aiohttp']:.2f}")


if __name__ == "__main__":
    main()
