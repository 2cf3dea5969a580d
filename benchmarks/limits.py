"""Limits and faults: what 429s, 5xx, dropped connections and quantised rate limits cost the factory, and a
plain AsyncOpenAI loop beside it (the SDK's own retries, 64 in flight), each against a fresh fake server.

    .venv/bin/python benchmarks/limits.py                  # all scenarios, results table on stdout
    .venv/bin/python benchmarks/limits.py --only faults    # one scenario (faultfree, faults, faults-short, rpm, tpm,
                                                           # tpm-fine, tpm-bucket)

Scenarios (the fake server is `python -m fakes` in its own process; 100 ms before every answer):
- faultfree / faults: 600 prompts; then 5 % 429s (retry-after 1 s, no rate-limit headers), 5 % 500s,
  2 % dropped connections and 2 % malformed 200 bodies, drawn per request with a fixed seed.
- faults-short: the same faults, the 429s asking for 0.1 s instead of 1 s: a prompt refused twice with
  `retry-after: 1` cannot finish sooner than 2.3 s after it is first sent, which bounds the faults row; this
  row shows what the factory adds beyond the waits it is told to keep.
- rpm: 600 requests/min enforced in fixed 2 s windows (20 a window), learnt from the headers alone (which
  describe the per-minute limit); 400 prompts.
- tpm: 20,000 tokens/min and 600 requests/min, both enforced in 2 s windows, learnt from the headers alone;
  a request costs its input tokens plus max_tokens (64) at the server; 300 prompts.
- tpm-fine: the tpm limits (600 requests/min raised to 6,000, not binding) with max_tokens 16: requests of about
  21 tokens, which can fill 97.7 % of a window (the tpm scenario's 69-token requests: 93.2 %); 600 prompts.
- tpm-bucket: 20,000 tokens/min in a token bucket that starts full (no short windows), 6,000 requests/min
  (never binding); 450 prompts (31,050 tokens: the bucket's 20,000, then 33 s of refill).
"Use" is what the server admitted over what the binding limit allows in the request phase: answered
requests / (rpm/60 × seconds), or charged tokens / (tpm/60 × seconds); for the bucket that starts full,
charged tokens / (tpm × (1 + seconds/60)), the most such a bucket admits in that time.
"""
from __future__ import annotations

import argparse
import ast
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
PY = sys.executable
MAX_TOKENS = 64

PLAIN = textwrap.dedent(
    """
    import asyncio, json, sys, time, openai
    url, n, conc, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    async def main():
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench")  # the SDK's defaults: 2 retries
        sem = asyncio.Semaphore(conc)
        async def one(i):
            async with sem:
                try:
                    r = await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"question number {i}"}],
                        temperature=0.8, max_tokens=max_tokens)
                    return r.choices[0].message.content is not None
                except Exception:
                    return False
        t = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        print(json.dumps({"loop_s": time.perf_counter() - t, "kept": sum(out)}))
    asyncio.run(main())
    """
)

SCENARIOS = {
    "faultfree": {"prompts": 600, "server": []},
    "faults": {"prompts": 600, "server": ["--fault-rate", "429=0.05", "--fault-rate", "500=0.05",
                                          "--fault-rate", "drop=0.02", "--fault-rate", "malformed=0.02",
                                          "--seed", "7"]},
    # the same faults, the 429s asking for a tenth of the wait: what the factory adds beyond the waits it is told
    "faults-short": {"prompts": 600, "server": ["--fault-rate", "429=0.05", "--fault-rate", "500=0.05",
                                                "--fault-rate", "drop=0.02", "--fault-rate", "malformed=0.02",
                                                "--seed", "7", "--retry-after", "0.1"]},
    "rpm": {"prompts": 400, "server": ["--rpm", "600", "--rate-quantum", "2"], "rpm": 600},
    "tpm": {"prompts": 300, "server": ["--rpm", "600", "--tpm", "20000", "--rate-quantum", "2"], "rpm": 600,
            "tpm": 20000},
    # the tpm limits with requests of about 21 tokens (max_tokens 16): whole requests can fill 97.7 % of a
    # 2 s window's 666 tokens, where the tpm row's 69-token requests fill at most 93.2 % (9 of them)
    "tpm-fine": {"prompts": 600, "server": ["--rpm", "6000", "--tpm", "20000", "--rate-quantum", "2"],
                 "tpm": 20000, "max_tokens": 16},
    "tpm-bucket": {"prompts": 450, "server": ["--rpm", "6000", "--tpm", "20000"], "tpm": 20000, "full": True},
}


class Server:
    def __init__(self, latency: float, extra: list[str]) -> None:
        self.proc = subprocess.Popen([PY, "-m", "fakes", "--port", "0", "--latency", str(latency), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            self.proc.kill()
            raise SystemExit(f"fake server did not start: {line} {self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{line[1]}/v1"

    def stop(self) -> dict:
        """The server's own count: total requests and responses by status (its exit line on stderr)."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        last = [line for line in err.splitlines() if line.startswith("fakeserver:")][-1]
        total = int(last.split()[1])
        by_status = ast.literal_eval(last.split("by status ", 1)[1])
        return {"total": total, "by_status": by_status}


def factory(workdir: Path, url: str, prompts: int, name: str, max_tokens: int) -> dict:
    prompt_file = workdir / f"{name}.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": str(i), "prompt": f"question number {i}"}) + "\n"
                                   for i in range(prompts)))
    run_dir = workdir / f"run-{name}"
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(
        f"factory:\n  output_dir: {run_dir}\n  prompts: {{path: {prompt_file}}}\n  checks: []\n"
        f"  teacher:\n    provider: openai\n    model: gpt-4o-mini\n    base_url: {url}\n"
        f"    params: {{temperature: 0.8, max_tokens: {max_tokens}}}\n    max_concurrency: 64\n"
        "    follow_latency: false\n")  # the fake stands for a hosted API, which answers 429 rather than queueing
    env = dict(os.environ, OPENAI_API_KEY="sk-bench")
    started = time.perf_counter()
    done = subprocess.run([PY, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    manifest = json.loads((run_dir / "manifest.json").read_text())
    kept = manifest["counts"]["accepted"] + manifest["counts"]["rejected"]
    return {"kept": kept, "loop_s": manifest["this_run"]["elapsed_s"], "wall_s": wall, "exit": done.returncode,
            "input_tokens": manifest["this_run"]["input_tokens"]}


def plain(url: str, prompts: int, max_tokens: int) -> dict:
    done = subprocess.run([PY, "-c", PLAIN, url, str(prompts), "64", str(max_tokens)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def use(spec: dict, answered: int, input_tokens: int | None, seconds: float) -> str:
    parts = []
    start = 60 if spec.get("full") else 0  # a bucket that starts full: its capacity, then its refill
    if spec.get("rpm"):
        parts.append(f"requests {answered / (spec['rpm'] / 60 * (start + seconds)):.0%}")
    if spec.get("tpm") and input_tokens is not None:
        charged = input_tokens + answered * spec.get("max_tokens", MAX_TOKENS)
        parts.append(f"tokens {charged / (spec['tpm'] / 60 * (start + seconds)):.0%}")
    return ", ".join(parts) or "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain AsyncOpenAI loop")
    parser.add_argument("--prompts", type=int, default=None, help="this many prompts in every scenario run")
    args = parser.parse_args()
    print(f"Command: `.venv/bin/python benchmarks/limits.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"Latency {args.latency * 1000:.0f} ms, 64 requests in flight at most\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(SCENARIOS):
            spec = dict(SCENARIOS[name], **({"prompts": args.prompts} if args.prompts else {}))
            tokens = spec.get("max_tokens", MAX_TOKENS)
            clients = [("factory", None)] + ([] if args.no_plain else [("plain AsyncOpenAI", None)])
            for client, _ in clients:
                server = Server(args.latency, spec["server"])
                try:
                    if client == "factory":
                        result = factory(Path(tmp), server.url, spec["prompts"], name, tokens)
                    else:
                        result = plain(server.url, spec["prompts"], tokens)
                        result["input_tokens"] = None
                finally:
                    seen = server.stop()
                answered = seen["by_status"].get(200, 0)
                limited = seen["by_status"].get(429, 0)
                row = (f"| {name} | {client} | {result['kept']}/{spec['prompts']} | {result['loop_s']:.1f} | "
                       f"{seen['total']} | {limited} ({limited / max(1, seen['total']):.1%}) | "
                       f"{use(spec, answered, result['input_tokens'], result['loop_s'])} |")
                print(row, flush=True)
                rows.append(row)
    print("\n| scenario | client | kept | request phase s | requests sent | 429s | use of the binding limit |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
