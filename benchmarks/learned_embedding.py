"""What the learned router's prompt embedding costs per request: hashed words against a sentence-embedding model
(routing.embedding: semantic, all-MiniLM-L6-v2), side by side in one process, rounds alternating.

For each prompt length (short ~10 words, medium ~60, long ~300: the model truncates at 256 tokens) it times
`LearnedRouter.agreement` with hashed words (inline on the event loop when serving), the model embedding one
prompt at a time (the cost when requests come one by one), and `agreement_served` with 8 and 32 requests
waiting at once (the serving path: one embedding thread, what waits goes as one batch). CPU, `--threads` torch
threads (default 1: the router shares its cores with the event loop).

    .venv/bin/python benchmarks/learned_embedding.py --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time

import torch

from serve.learned import BASE_FEATURES, HASHED_WORDS, LearnedRouter, load_prompt_embedder

WORDS = ("the quarterly report shows revenue grew in the northern region while costs in logistics fell "
         "because the new routing software cut fuel use and the team asks whether to expand the pilot to "
         "the southern warehouses next spring or wait for another quarter of data").split()


def prompt(words: int, i: int) -> list[dict[str, str]]:
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
    return [{"role": "user", "content": f"Question {i}: {text}?"}]


def per_prompt(run, prompts) -> float:
    """Seconds per prompt of `run(prompts)`."""
    start = time.perf_counter()
    run(prompts)
    return (time.perf_counter() - start) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    embedder = load_prompt_embedder("semantic", "benchmark")
    load_s = time.perf_counter() - start
    dimensions = len(embedder([""])[0])
    hashed = LearnedRouter([0.01] * (BASE_FEATURES + HASHED_WORDS), 0.0)
    semantic = LearnedRouter([0.01] * (BASE_FEATURES + dimensions), 0.0, "semantic", embedder)

    def one_by_one(router: LearnedRouter):
        return lambda prompts: [router.agreement(p, "an answer", -0.3) for p in prompts]

    def waiting(count: int):
        async def together(prompts):
            for start in range(0, len(prompts), count):
                await asyncio.gather(*(semantic.agreement_served(p, "an answer", -0.3)
                                       for p in prompts[start:start + count]))
        return lambda prompts: asyncio.run(together(prompts))

    ways = {"hashed words": one_by_one(hashed), "model, one at a time": one_by_one(semantic),
            "model, 8 waiting": waiting(8), "model, 32 waiting": waiting(32)}
    lengths = {"short (~10 words)": 10, "medium (~60 words)": 60, "long (~300 words)": 300}
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
        for length, words in lengths.items():
            prompts = [prompt(words, i) for i in range(args.prompts)]
            for way in order:
                ways[way](prompts[:4])  # warm: the thread, the allocator
                results.setdefault((length, way), []).append(per_prompt(ways[way], prompts))
    semantic.close()
    load_after = os.getloadavg()
    print(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch thread(s)\n")
    print(f"Load average before {load_before[0]:.2f} {load_before[1]:.2f}, after {load_after[0]:.2f} "
          f"{load_after[1]:.2f}. Model loaded in {load_s:.2f} s ({dimensions} dimensions). Median of "
          f"{args.rounds} rounds of {args.prompts} prompts; ms per prompt (× hashed words).\n")
    print("| prompt | " + " | ".join(ways) + " |")
    print("|---|" + "---|" * len(ways))
    for length in lengths:
        base = statistics.median(results[(length, "hashed words")])
        cells = []
        for way in ways:
            value = statistics.median(results[(length, way)])
            cells.append(f"{value * 1000:.3f}" + ("" if way == "hashed words" else f" ({value / base:.0f}×)"))
        print(f"| {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
