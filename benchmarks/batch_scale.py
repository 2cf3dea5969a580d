"""Batch mode at scale: the 100k-sample Batch API recipe against the fake server, and batch versus online
on the same prompts, side by side in one run.

The recipe is `data/recipes/openai-batch-100k.yaml` as shipped (its grid, n=2, its seven checks) with
the teacher pointed at a loopback fake server in its own process (batches end as soon as they are
asked about; online answers after `--latency`). Each factory run is its own process; its CPU seconds
and peak RSS come from wait4.

    .venv/bin/python benchmarks/batch_scale.py                     # 10,000 prompts both ways, then 50,000 in batch
    .venv/bin/python benchmarks/batch_scale.py --prompts 2000 --full 0   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from factory_overhead import PY, REPO, run_measured, start_server  # noqa: E402

RECIPE = REPO / "data" / "recipes" / "openai-batch-100k.yaml"


def factory(run_dir: Path, url: str, mode: str, prompts: int, concurrency: int) -> dict:
    env = dict(os.environ, BENCH_KEY="sk-bench", HF_HUB_OFFLINE="1")
    sets = [f"factory.output_dir={run_dir}", f"factory.teacher.base_url={url}", "factory.teacher.api_key_env=BENCH_KEY",
            f"factory.teacher.mode={mode}", "factory.teacher.batch.poll_s=0.5", "factory.budget_usd=null",
            f"factory.prompts.grid.count={prompts}", f"factory.teacher.max_concurrency={concurrency}",
            "factory.teacher.follow_latency=false"]  # the fake stands for a hosted API (429s, no queue)
    cmd = [PY, "-m", "factory", "generate", str(RECIPE)] + [arg for item in sets for arg in ("--set", item)]
    result = run_measured(cmd, env)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if manifest["status"] != "complete":
        raise SystemExit(f"{mode} run ended {manifest['status']}: {result.get('stderr', '')[-2000:]}")
    counts, this_run = manifest["counts"], manifest["this_run"]
    return {
        "mode": mode, "prompts": prompts, "samples": counts["accepted"] + counts["rejected"],
        "accepted": counts["accepted"], "requests": this_run["requests"],
        "batches": (manifest.get("batches") or {}).get("fetched", "–"),
        "wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "rss_mib": result["max_rss_mib"],
        "run_s": this_run["elapsed_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=10_000, help="prompts for the batch-versus-online rows")
    parser.add_argument("--full", type=int, default=50_000, help="prompts for the batch-only row (0: skip)")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    server, url = start_server(args.latency)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            rows.append(factory(work / "batch", url, "batch", args.prompts, args.concurrency))
            rows.append(factory(work / "online", url, "online", args.prompts, args.concurrency))
            if args.full:
                rows.append(factory(work / "full", url, "batch", args.full, args.concurrency))
    finally:
        server.terminate()
        server.wait()

    load = os.getloadavg()
    lines = [
        "| mode | prompts | samples | requests | batches | wall s | factory CPU s | CPU ms / request | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['prompts']:,} | {row['samples']:,} | {row['requests']:,} | {row['batches']} | "
            f"{row['wall_s']:.1f} | {row['cpu_s']:.1f} | {1000 * row['cpu_s'] / max(1, row['requests']):.2f} | "
            f"{row['rss_mib']:.0f} |")
    batch, online = rows[0], rows[1]
    lines.append("")
    lines.append(f"Same prompts, batch / online: wall {batch['wall_s'] / online['wall_s']:.2f}×, "
                 f"CPU {batch['cpu_s'] / online['cpu_s']:.2f}×, peak RSS {batch['rss_mib'] / online['rss_mib']:.2f}×.")
    lines.append(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                 f"{platform.python_version()}; load average at the end {load[0]:.1f} / {load[1]:.1f}.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
