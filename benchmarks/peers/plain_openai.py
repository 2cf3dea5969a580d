"""Driver: a plain `AsyncOpenAI` loop with a semaphore, what people write by hand.

    .venv/bin/python benchmarks/peers/plain_openai.py --base-url URL --requests N --concurrency C

Prints one JSON line: import_s, loop_s (around the gather), ok, failed, version. Each request sends
the same body as the other drivers: model gpt-4o-mini, one user message "question number <i>",
temperature 0.8, max_tokens 64. Retries: the SDK's own (429/5xx/connection errors, honouring
retry-after), `--max-retries` times per request; a request still failing then counts as failed.
"""
from __future__ import annotations

import argparse
import json
import time

started = time.perf_counter()
import asyncio  # noqa: E402

import openai  # noqa: E402

import_s = time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="sk-bench", max_retries=args.max_retries)
    gate = asyncio.Semaphore(args.concurrency)
    answers: list[str | None] = [None] * args.requests

    async def one(i: int) -> None:
        async with gate:
            try:
                reply = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"question number {i}"}],
                    temperature=0.8, max_tokens=64)
            except openai.APIError:
                return
            answers[i] = reply.choices[0].message.content

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    loop_s = time.perf_counter() - start
    await client.close()
    ok = sum(answer is not None for answer in answers)
    return {"import_s": import_s, "loop_s": loop_s, "ok": ok, "failed": args.requests - ok,
            "version": f"openai {openai.__version__}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-retries", type=int, default=8)
    parser.add_argument("--import-only", action="store_true")
    args = parser.parse_args()
    if args.import_only:
        print(json.dumps({"import_s": import_s}))
        return
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
