"""Does eval's throughput pass for a served model (`eval.served_concurrency`) measure what the server can do?

    .venv/bin/python benchmarks/served_throughput.py [--prompts 64] [--capacity 8] [--latency 0.1]

The fake server (in this process, on its own thread) serves `capacity` requests at once, each for `latency`
seconds, and queues the rest, as vLLM and SGLang do: its best throughput is min(concurrency, capacity) / latency
answers per second. eval's own functions (eval/answer.py: `time_hosted`, one request at a time as
`eval.timed_requests` sends them, and `served_throughput` at each concurrency) run against it, one after the
other in one process, each against a fresh server, with the $ per 1k answers eval.cost's GPU hour gives.
No torch is involved.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.answer import machine_cost, served_throughput, time_hosted  # noqa: E402
from eval.config import ModelConfig  # noqa: E402
from eval.golden import load_golden  # noqa: E402
from fakes import FakeConfig, FakeServer  # noqa: E402

GPU_HOUR_USD = 2.5
CONCURRENCIES = (1, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        golden = Path(tmp) / "golden.jsonl"
        golden.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question number {i}", "reference": "x"})
                                  + "\n" for i in range(args.prompts)))
        items = load_golden([golden], ["exact"])
        for concurrency in (None, *CONCURRENCIES):
            with FakeServer(FakeConfig(latency_s=args.latency, capacity=args.capacity)) as server:
                model = ModelConfig(name="served", provider="openai", model="student", base_url=server.openai_base_url,
                                    params={"temperature": 0, "max_tokens": 16})
                if concurrency is None:  # the timing pass: one at a time, throughput is 1 / latency
                    perf, sent = time_hosted(model, items, args.prompts)
                    label, answers_per_s = "one at a time (eval.timed_requests)", len(sent.latencies) / sent.wall_s
                else:
                    perf, sent = served_throughput(model, items, concurrency)
                    label, answers_per_s = f"served_concurrency: {concurrency}", perf["answers_per_s"]
                if "timing_error" in perf or "throughput_error" in perf:
                    raise SystemExit(f"{label}: {perf}")
            best = min(concurrency or 1, args.capacity) / args.latency
            rows.append((label, len(sent.latencies), answers_per_s, best, sent.output_tokens / sent.wall_s,
                         machine_cost({"answers_per_s": answers_per_s}, GPU_HOUR_USD)))
    load = os.getloadavg()
    print(f"{args.prompts} golden prompts; the fake server serves {args.capacity} at once, {args.latency * 1000:.0f} ms "
          f"each. Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load "
          f"average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end.\n")
    print(f"| pass | requests | answers/s measured | the server's best | measured ÷ best | output tokens/s | "
          f"$ per 1k answers at ${GPU_HOUR_USD}/GPU h |")
    print("|---|---|---|---|---|---|---|")
    for label, count, measured, best, tokens, cost in rows:
        print(f"| {label} | {count} | {measured:.1f} | {best:.1f} | {measured / best:.2f} | {tokens:.0f} | "
              f"{cost:.4f} |")


if __name__ == "__main__":
    main()
