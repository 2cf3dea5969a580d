"""A server that queues instead of answering 429 (as vLLM and SGLang do): what following latency buys.

    .venv/bin/python benchmarks/queueing.py [--prompts 1000] [--capacity 8] [--latency 0.1]

The fake server (in this process, on its own thread) serves `capacity` requests at once, each for `latency`
seconds, and queues the rest first come, first served: throughput is capacity / latency whatever the client
sends. Three clients, each against a fresh server: the factory with `follow_latency: true` (its default with a
base_url), the factory with it off, and a plain AsyncOpenAI loop with as many requests in flight as the
factory's ceiling. Each run's wall time and the server's own count of how long requests waited in its queue.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fakes import FakeConfig, FakeServer  # noqa: E402

PY = sys.executable
CEILING = 256

PLAIN = textwrap.dedent(
    """
    import asyncio, sys, openai
    url, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    async def main():
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=0, timeout=600)
        sem = asyncio.Semaphore(conc)
        async def one(i):
            async with sem:
                await client.chat.completions.create(model="gpt-4o-mini", max_tokens=32,
                    messages=[{"role": "user", "content": f"question number {i}"}])
        await asyncio.gather(*(one(i) for i in range(n)))
    asyncio.run(main())
    """
)


def factory(workdir: Path, url: str, prompts: int, follow: bool) -> None:
    name = f"follow-{str(follow).lower()}"
    prompt_file = workdir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": str(i), "prompt": f"question number {i}"}) + "\n"
                                   for i in range(prompts)))
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(
        f"factory:\n  output_dir: {workdir / ('run-' + name)}\n  prompts: {{path: {prompt_file}}}\n  checks: []\n"
        f"  teacher:\n    provider: openai\n    model: gpt-4o-mini\n    base_url: {url}\n"
        f"    params: {{max_tokens: 32}}\n    max_concurrency: {CEILING}\n    follow_latency: {str(follow).lower()}\n")
    subprocess.run([PY, "-m", "factory", "generate", str(recipe), "-q"], cwd=REPO, check=True,
                   env=dict(os.environ, OPENAI_API_KEY="sk-bench"))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    best = args.prompts / args.capacity * args.latency
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for client in ("factory, follow_latency: true", "factory, follow_latency: false",
                       f"plain AsyncOpenAI, {CEILING} in flight"):
            with FakeServer(FakeConfig(latency_s=args.latency, capacity=args.capacity)) as server:
                workdir = Path(tmp) / str(len(rows))
                workdir.mkdir()
                started = time.perf_counter()
                if client.startswith("factory"):
                    factory(workdir, server.openai_base_url, args.prompts, follow="true" in client)
                else:
                    subprocess.run([PY, "-c", PLAIN, server.openai_base_url, str(args.prompts), str(CEILING)],
                                   cwd=REPO, check=True)
                wall = time.perf_counter() - started
                waits = server.stats.snapshot()["queue_waits"]
            rows.append((client, wall, percentile(waits, 0.5), percentile(waits, 0.95), max(waits)))
    print(f"{args.prompts} prompts; the server serves {args.capacity} at once, {args.latency * 1000:.0f} ms each: "
          f"{best:.1f} s at best. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}.\n")
    print("| client | wall s (incl. start-up) | queue wait p50 s | p95 s | max s |")
    print("|---|---|---|---|---|")
    for client, wall, p50, p95, longest in rows:
        print(f"| {client} | {wall:.1f} | {p50:.2f} | {p95:.2f} | {longest:.2f} |")


if __name__ == "__main__":
    main()
