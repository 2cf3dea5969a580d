"""Factory overhead versus a plain AsyncOpenAI + semaphore loop, side by side in one run.

Both clients talk to the same loopback fake server (`python -m fakes`, its own process)
with a fixed latency, through the same SDK. Each client runs in its own process, one after the other,
alternating, so neither shares a core with the other; the server has the other core.

    .venv/bin/python benchmarks/factory_overhead.py                 # throughput rows
    .venv/bin/python benchmarks/factory_overhead.py --memory --no-throughput  # peak RSS, 20k vs 200k prompts

Rates are measured over the request loop of each (the factory's own elapsed time from manifest.json,
which starts after the prompt file is validated; the baseline's timer around its gather), and
whole-process wall and CPU seconds are reported beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

BASELINE = textwrap.dedent(
    """
    import asyncio, json, sys, time, openai
    url, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    async def main():
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=0)
        sem = asyncio.Semaphore(conc)
        async def one(i):
            async with sem:
                r = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"question number {i}"}],
                    temperature=0.8, max_tokens=64)
                return r.choices[0].message.content
        t = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        dt = time.perf_counter() - t
        assert len(out) == n
        print(json.dumps({"loop_s": dt}))
    asyncio.run(main())
    """
)


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float | str]:
    """Run a process to its end; its output, wall seconds, and (from wait4) its own CPU and peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "stdout": stdout,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mib": usage.ru_maxrss / 1024,
    }


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [PY, "-m", "fakes", "--port", "0", "--latency", str(latency), "--max-requests", "1000000"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    line = server.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        server.kill()
        raise SystemExit(f"fake server did not start: {line}")
    return server, f"http://127.0.0.1:{line[1]}/v1"


def write_inputs(workdir: Path, url: str, prompts: int, concurrency: int, name: str) -> Path:
    prompt_file = workdir / f"{name}.jsonl"
    with prompt_file.open("w") as handle:
        for i in range(prompts):
            handle.write(json.dumps({"id": str(i), "prompt": f"question number {i}"}) + "\n")
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(
        "factory:\n"
        f"  output_dir: {workdir / ('run-' + name)}\n"
        f"  prompts: {{path: {prompt_file}}}\n"
        "  teacher:\n"
        "    provider: openai\n"
        "    model: gpt-4o-mini\n"
        f"    base_url: {url}\n"
        "    params: {temperature: 0.8, max_tokens: 64}\n"
        f"    max_concurrency: {concurrency}\n"
    )
    return recipe


def factory_run(recipe: Path) -> dict[str, float | str]:
    env = dict(os.environ, OPENAI_API_KEY="sk-bench")
    result = run_measured([PY, "-m", "factory", "generate", str(recipe)], env)
    manifest = json.loads((Path(recipe.read_text().split("output_dir: ")[1].split("\n")[0]) / "manifest.json").read_text())
    result["loop_s"] = manifest["this_run"]["elapsed_s"]
    result["requests"] = manifest["this_run"]["requests"]
    result["rate_limited"] = manifest["this_run"]["rate_limited"]
    return result


def throughput(args: argparse.Namespace, workdir: Path) -> list[str]:
    server, url = start_server(args.latency)
    rows = []
    try:
        base_rates, fac_rates, base_cpu, fac_cpu = [], [], [], []
        for round_no in range(args.rounds):
            base = run_measured([PY, "-c", BASELINE, url, str(args.requests), str(args.concurrency)])
            loop_s = json.loads(base["stdout"])["loop_s"]
            base_rates.append(args.requests / loop_s)
            base_cpu.append(base["cpu_s"])
            recipe = write_inputs(workdir, url, args.requests, args.concurrency, f"t{round_no}")
            fac = factory_run(recipe)
            assert fac["requests"] == args.requests, fac
            fac_rates.append(args.requests / fac["loop_s"])
            fac_cpu.append(fac["cpu_s"])
            print(
                f"round {round_no + 1}: baseline {base_rates[-1]:.1f} req/s ({base['cpu_s']:.2f} CPU s), "
                f"factory {fac_rates[-1]:.1f} req/s ({fac['cpu_s']:.2f} CPU s)",
                flush=True,
            )
        b, f = statistics.median(base_rates), statistics.median(fac_rates)
        rows.append("| client | requests/s (median) | process CPU s per 1,000 requests | ratio to baseline |")
        rows.append("|---|---|---|---|")
        rows.append(f"| plain AsyncOpenAI + semaphore | {b:.1f} | {1000 * statistics.median(base_cpu) / args.requests:.2f} | 1.00 |")
        rows.append(f"| `python -m factory generate` | {f:.1f} | {1000 * statistics.median(fac_cpu) / args.requests:.2f} | {f / b:.2f} |")
        rows.append("")
        rows.append(f"Per round, baseline req/s: {', '.join(f'{x:.1f}' for x in base_rates)}; "
                    f"factory req/s: {', '.join(f'{x:.1f}' for x in fac_rates)}.")
    finally:
        server.terminate()
        server.wait()
    return rows


def memory(args: argparse.Namespace, workdir: Path) -> list[str]:
    server, url = start_server(0.0)
    rows = ["| prompts | peak RSS (MiB) | wall s | ratio to 20,000 |", "|---|---|---|---|"]
    try:
        results = {}
        for count in (20_000, 200_000):
            recipe = write_inputs(workdir, url, count, args.concurrency, f"m{count}")
            fac = factory_run(recipe)
            assert fac["requests"] == count, fac
            results[count] = fac
            print(f"{count} prompts: peak RSS {fac['max_rss_mib']:.1f} MiB in {fac['wall_s']:.0f} s", flush=True)
        small = results[20_000]["max_rss_mib"]
        for count, fac in results.items():
            rows.append(f"| {count:,} | {fac['max_rss_mib']:.1f} | {fac['wall_s']:.0f} | {fac['max_rss_mib'] / small:.2f} |")
    finally:
        server.terminate()
        server.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS for 20k and 200k prompts")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lines = [
            f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/factory_overhead.py'] + sys.argv[1:])}`",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.platform()}",
            f"Setup: {args.requests} requests, concurrency {args.concurrency}, server latency {args.latency * 1000:.0f} ms, "
            f"{args.rounds} alternating rounds",
            "",
        ]
        if not args.no_throughput:
            lines += throughput(args, workdir)
        if args.memory:
            lines += ["", "Peak RSS of `python -m factory generate` (server latency 0):", ""] + memory(args, workdir)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
