"""Driver: bespokelabs-curator's online OpenAI backend (aiohttp, its own rate limiter and retries).

    benchmarks/.venvs/curator/bin/python benchmarks/peers/curator_driver.py --base-url URL --requests N \
        --concurrency C --workdir DIR [--rpm R --tpm T]

Prints one JSON line: import_s, loop_s (around building the `LLM` and `llm(dataset)`: the whole curator
run, from its probe request, the Arrow dataset of prompts and the request file, through the requests, to
the response file read back into an Arrow dataset), request_phase_s (curator's own tracker's time of the
request phase alone), ok, failed, version. Same prompts, model and parameters
as the other drivers. `--rpm/--tpm` are passed as `max_requests_per_minute/max_tokens_per_minute`;
left out, curator takes them from the `x-ratelimit-limit-*` headers of a probe request it sends
first, and falls back to its defaults (200 rpm, 100,000 tpm) when the server sends none.
The environment (set by benchmarks/peers.py) turns telemetry off and points tiktoken at a
pre-filled cache.
"""
from __future__ import annotations

import argparse
import json
import os
import time

started = time.perf_counter()
from bespokelabs import curator  # noqa: E402

import_s = time.perf_counter() - started


class Ask(curator.LLM):
    def prompt(self, row: dict) -> str:
        return row["prompt"]

    def parse(self, row: dict, response: str) -> dict:
        return {"id": row["id"], "response": response}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--import-only", action="store_true")
    args = parser.parse_args()
    if args.import_only:
        print(json.dumps({"import_s": import_s}))
        return
    backend_params = {"base_url": args.base_url, "api_key": "sk-bench", "max_concurrent_requests": args.concurrency}
    if args.rpm:
        backend_params["max_requests_per_minute"] = args.rpm
    if args.tpm:
        backend_params["max_tokens_per_minute"] = args.tpm
    rows = [{"id": str(i), "prompt": f"question number {i}"} for i in range(args.requests)]
    start = time.perf_counter()
    llm = Ask(model_name="gpt-4o-mini", backend="openai",
              generation_params={"temperature": 0.8, "max_tokens": 64}, backend_params=backend_params)
    result = llm(rows, working_dir=args.workdir)
    loop_s = time.perf_counter() - start
    dataset = result.dataset if hasattr(result, "dataset") else result
    ok = sum(1 for row in dataset if row.get("response"))
    from importlib.metadata import version

    stats = getattr(result, "performance_stats", None)
    print(json.dumps({"import_s": import_s, "loop_s": loop_s, "ok": ok, "failed": args.requests - ok,
                      "request_phase_s": getattr(stats, "total_time", None),
                      "version": f"bespokelabs-curator {version('bespokelabs-curator')}"}))


if __name__ == "__main__":
    os.environ.setdefault("TELEMETRY_ENABLED", "false")
    main()
