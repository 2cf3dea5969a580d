"""Generation on Ray (`factory.runner: ray`) beside the single-process runner: the same build against the fake
provider (`python -m fakes` in its own process, a fresh one per run), then the same under a shared rate limit.

    .venv/bin/python benchmarks/ray_scale.py                          # 5,000 prompts; 1, 2 and 4 workers
    .venv/bin/python benchmarks/ray_scale.py --prompts 20000 --workers 1 2 4 --only scale

Scenarios:
- scale: N prompts, 50 ms before every answer, 64 requests in flight per worker, checks
  [empty, truncated, refusal, exact_dup] (the last one run-wide: the merge checks it across shards).
  The client's CPU is the limit: 64 in flight at 50 ms allow 1,280 requests/s per worker.
- limit: 400 prompts (--limit-prompts); the server enforces 600 requests/min in fixed 2 s windows (20 a window), the
  headers describing the minute (the `rpm` scenario of benchmarks/limits.py); the recipe gives no rpm, so each worker learns the limit from the headers
  and takes its share (1/workers) of it.

Columns: wall s is the whole command (Python's start, Ray's start, the merge); generation s is the run's
elapsed time, from its first request to its last record (ray: the longest shard's); tasks s is the first
shard task's start to the last one's end (each task's set-up included: imports, teacher, cache, the
run-wide index); client CPU s is what the
run processes spent from their start (manifest `this_run.cpu_s`, summed over the shards), so the driver's
Ray start-up and the Ray daemons are not in it. "Use" is answered requests over what the limit allows in
the generation time; "pace at the end" is each shard's manifest `this_run.pace_share`, the share of the learnt
limit its limiter sent at when it finished (0.97 unless 429s with room left cut it; answers give it back slowly).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import Server  # noqa: E402 - the fake server in its own process, and its own request counts

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RPM = 600
LIMIT_PROMPTS = 400


def build(workdir: Path, url: str, prompts: int, name: str, workers: int | None) -> dict:
    prompt_file = workdir / f"{name}.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": str(i), "prompt": f"question number {i}"}) + "\n"
                                   for i in range(prompts)))
    run_dir = workdir / f"run-{name}"
    runner = f"  runner: ray\n  ray: {{workers: {workers}}}\n" if workers else ""
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(
        f"factory:\n  output_dir: {run_dir}\n  prompts: {{path: {prompt_file}}}\n"
        f"  checks: [empty, truncated, refusal, exact_dup]\n{runner}"
        f"  teacher:\n    provider: openai\n    model: gpt-4o-mini\n    base_url: {url}\n"
        f"    params: {{temperature: 0.8, max_tokens: 64}}\n    max_concurrency: 64\n"
        "    follow_latency: false\n")  # the fake stands for a hosted API, which answers 429 rather than queueing
    env = dict(os.environ, OPENAI_API_KEY="sk-bench")
    started = time.perf_counter()
    done = subprocess.run([PY, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    this_run, ray = manifest["this_run"], manifest.get("ray") or {}
    shards = [json.loads(path.read_text())["this_run"] for path in sorted(run_dir.glob("shards/*/manifest.json"))]
    paces = [entry.get("pace_share") for entry in (shards or [this_run])]
    return {"kept": manifest["counts"]["accepted"] + manifest["counts"]["rejected"], "wall": wall,
            "generation": ray.get("longest_shard_s", this_run["elapsed_s"]), "tasks": ray.get("shards_s"),
            "cpu": this_run["cpu_s"],
            "start": ray.get("start_s"), "merge": ray.get("merge_s"), "requests": this_run["requests"],
            "paces": [pace for pace in paces if pace is not None]}


def show(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--only", choices=["scale", "limit"])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--limit-prompts", type=int, default=LIMIT_PROMPTS,
                        help="the limit scenario's prompts (400: 40 s at the limit)")
    args = parser.parse_args()
    print(f"Command: `.venv/bin/python benchmarks/ray_scale.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at the start\n")
    runners = [("local", None)] + [(f"ray × {w}", w) for w in args.workers]
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "scale"):
            rows, base = [], None
            for label, workers in runners:
                server = Server(args.latency, [])
                try:
                    r = build(Path(tmp), server.url, args.prompts, f"scale-{workers or 0}", workers)
                finally:
                    seen = server.stop()
                rate = r["requests"] / r["generation"]
                base = base or r
                rows.append(
                    f"| {label} | {r['kept']}/{args.prompts} | {r['wall']:.1f} | {r['generation']:.1f} | "
                    f"{show(r['start'], 1)} | {show(r['tasks'], 1)} | {show(r['merge'], 2)} | "
                    f"{rate:.0f} | {base['generation'] / r['generation']:.2f}× | {r['cpu']:.1f} | "
                    f"{1000 * r['cpu'] / max(1, r['requests']):.2f} | {seen['total']} |")
                print(rows[-1], flush=True)
            print(f"\n### scale: {args.prompts:,} prompts, {args.latency * 1000:.0f} ms latency, 64 in flight per worker\n")
            print("| runner | kept | wall s | generation s | Ray start s | tasks s | merge s | req/s | speed vs local "
                  "(generation) | client CPU s | CPU ms / request | requests at the server |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            print("\n".join(rows))
        if args.only in (None, "limit"):
            rows = []
            for label, workers in runners:
                server = Server(args.latency, ["--rpm", str(RPM), "--rate-quantum", "2"])
                try:
                    r = build(Path(tmp), server.url, args.limit_prompts, f"limit-{workers or 0}", workers)
                finally:
                    seen = server.stop()
                answered = seen["by_status"].get(200, 0)
                limited = seen["by_status"].get(429, 0)
                rows.append(f"| {label} | {r['kept']}/{args.limit_prompts} | {r['generation']:.1f} | "
                            f"{seen['total']} | "
                            f"{limited} ({limited / max(1, seen['total']):.1%}) | "
                            f"{answered / (RPM / 60 * r['generation']):.0%} | "
                            f"{', '.join(f'{pace:.3f}' for pace in r['paces']) or '—'} |")
                print(rows[-1], flush=True)
            print(f"\n### limit: {RPM:,} requests/min in 2 s windows, learnt from the headers, "
                  f"{args.limit_prompts} prompts\n")
            print("| runner | kept | generation s | requests sent | 429s | use of the limit "
                  "| pace at the end (each shard) |")
            print("|---|---|---|---|---|---|---|")
            print("\n".join(rows))


if __name__ == "__main__":
    main()
