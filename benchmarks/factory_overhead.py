"""Factory overhead versus a plain AsyncOpenAI + semaphore loop, side by side in one run.

Three clients talk to the same loopback fake server (`python -m fakes`, its own process) with a fixed
latency: the plain SDK loop, `python -m factory generate` with `teacher.client: sdk` (the openai SDK) and
with `teacher.client: raw` (the lean path, factory/teachers/wire.py). Each runs in its own process, one after
the other, in an order that rotates every round, so none shares a core with another; the server has the
other core.

    .venv/bin/python benchmarks/factory_overhead.py                 # throughput rows
    .venv/bin/python benchmarks/factory_overhead.py --profile       # and where the raw factory's CPU goes
    .venv/bin/python benchmarks/factory_overhead.py --provider anthropic  # the Messages API, AsyncAnthropic
    .venv/bin/python benchmarks/factory_overhead.py --memory --no-throughput  # peak RSS, 20k vs 200k prompts

Rates are measured over the request loop of each (the factory's own elapsed time from manifest.json,
which starts after the prompt file is validated; the baseline's timer around its gather), and
whole-process wall and CPU seconds are reported beside them. Every round also runs each client with one
request: its process CPU is the start-up (imports, set-up, the end-of-run stats), and what the full run
costs beyond it, per request, is the CPU each request adds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# provider → (model, the base_url's path on the fake server)
PROVIDERS = {"openai": ("gpt-4o-mini", "/v1"), "anthropic": ("claude-haiku-4-5", "")}

BASELINE = textwrap.dedent(
    """
    import asyncio, json, sys, time
    url, n, conc, provider = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    async def main():
        sem = asyncio.Semaphore(conc)
        if provider == "openai":
            import openai
            client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=0)
            async def one(i):
                async with sem:
                    r = await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"question number {i}"}],
                        temperature=0.8, max_tokens=64)
                    return r.choices[0].message.content
        else:
            import anthropic
            client = anthropic.AsyncAnthropic(base_url=url, api_key="sk-bench", max_retries=0)
            async def one(i):
                async with sem:
                    # This SDK's create() declares no temperature: it travels in extra_body, as the factory sends it.
                    r = await client.messages.create(
                        model="claude-haiku-4-5", messages=[{"role": "user", "content": f"question number {i}"}],
                        max_tokens=64, extra_body={"temperature": 0.8})
                    return r.content[0].text
        t = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(n)))
        dt = time.perf_counter() - t
        assert len(out) == n
        print(json.dumps({"loop_s": dt}))
    asyncio.run(main())
    """
)


# `python -m factory generate` under cProfile, timed in CPU seconds (`python -m cProfile` times the wall clock,
# which on a shared machine counts the time other processes had the core).
PROFILED = textwrap.dedent(
    """
    import cProfile, runpy, sys, time
    out, recipe = sys.argv[1], sys.argv[2]
    sys.argv = ["factory", "generate", recipe]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module("factory", run_name="__main__")
    except SystemExit:
        pass
    profiler.disable()
    profiler.dump_stats(out)
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


def start_server(latency: float, provider: str = "openai") -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [PY, "-m", "fakes", "--port", "0", "--latency", str(latency), "--max-requests", "1000000"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    line = server.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        server.kill()
        raise SystemExit(f"fake server did not start: {line}")
    return server, f"http://127.0.0.1:{line[1]}{PROVIDERS[provider][1]}"


def write_inputs(workdir: Path, url: str, prompts: int, concurrency: int, name: str, client: str = "raw",
                 provider: str = "openai") -> Path:
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
        f"    provider: {provider}\n"
        f"    model: {PROVIDERS[provider][0]}\n"
        f"    base_url: {url}\n"
        "    params: {temperature: 0.8, max_tokens: 64}\n"
        f"    max_concurrency: {concurrency}\n"
        "    follow_latency: false\n"  # the fake stands for a hosted API, which answers 429 rather than queueing
        f"    client: {client}\n"
    )
    return recipe


def factory_run(recipe: Path) -> dict[str, float | str]:
    env = dict(os.environ, OPENAI_API_KEY="sk-bench", ANTHROPIC_API_KEY="sk-bench")
    result = run_measured([PY, "-m", "factory", "generate", str(recipe)], env)
    manifest = json.loads((Path(recipe.read_text().split("output_dir: ")[1].split("\n")[0]) / "manifest.json").read_text())
    result["loop_s"] = manifest["this_run"]["elapsed_s"]
    result["requests"] = manifest["this_run"]["requests"]
    result["rate_limited"] = manifest["this_run"]["rate_limited"]
    return result


ARMS = ("baseline", "sdk", "raw")
LABELS = {"baseline": "plain SDK client (AsyncOpenAI / AsyncAnthropic) + semaphore", "sdk": "`python -m factory generate`, `teacher.client: sdk`",
          "raw": "`python -m factory generate`, `teacher.client: raw`"}


def one_arm(arm: str, url: str, requests: int, args: argparse.Namespace, workdir: Path, name: str) -> tuple[float, float]:
    """(requests/s over the request loop, process CPU seconds) of one client doing `requests` requests."""
    if arm == "baseline":
        base = run_measured([PY, "-c", BASELINE, url, str(requests), str(args.concurrency), args.provider])
        return requests / json.loads(base["stdout"])["loop_s"], float(base["cpu_s"])
    fac = factory_run(write_inputs(workdir, url, requests, args.concurrency, f"{name}-{arm}", arm, args.provider))
    assert fac["requests"] == requests, fac
    return requests / float(fac["loop_s"]), float(fac["cpu_s"])


def throughput(args: argparse.Namespace, workdir: Path) -> list[str]:
    server, url = start_server(args.latency, args.provider)
    rows = []
    try:
        rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
        cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
        start_cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for round_no in range(args.rounds):
            order = ARMS[round_no % len(ARMS):] + ARMS[:round_no % len(ARMS)]
            for arm in order:
                rate, cpu_s = one_arm(arm, url, args.requests, args, workdir, f"t{round_no}")
                rates[arm].append(rate)
                cpu[arm].append(cpu_s)
                start_cpu[arm].append(one_arm(arm, url, 1, args, workdir, f"s{round_no}")[1])
            print(f"round {round_no + 1} ({', '.join(order)}): " + ", ".join(
                f"{arm} {rates[arm][-1]:.1f} req/s ({cpu[arm][-1]:.2f} CPU s, start-up {start_cpu[arm][-1]:.2f})"
                for arm in ARMS), flush=True)
        median = {arm: statistics.median(rates[arm]) for arm in ARMS}
        rows.append("| client | requests/s (median) | process CPU s per 1,000 requests | start-up CPU s (a run of "
                    "1 request) | CPU ms per request beyond start-up | requests/s ÷ baseline's |")
        rows.append("|---|---|---|---|---|---|")
        for arm in ARMS:
            whole, start = statistics.median(cpu[arm]), statistics.median(start_cpu[arm])
            rows.append(f"| {LABELS[arm]} | {median[arm]:.1f} | {1000 * whole / args.requests:.2f} | {start:.2f} | "
                        f"{1000 * (whole - start) / (args.requests - 1):.2f} | {median[arm] / median['baseline']:.2f} |")
        rows.append("")
        rows.append("Per round, req/s: " + "; ".join(
            f"{arm} {', '.join(f'{x:.1f}' for x in rates[arm])}" for arm in ARMS) + ".")
        rows.append("Per round, process CPU s: " + "; ".join(
            f"{arm} {', '.join(f'{x:.2f}' for x in cpu[arm])}" for arm in ARMS) + ".")
    finally:
        server.terminate()
        server.wait()
    return rows


# Where a profiled function's time is counted: the first pattern its file or name contains.
AREAS = (
    ("select.epoll", "epoll (the system call; waiting costs no CPU)"),
    ("_socket.socket", "socket system calls (send, recv)"),
    ("sqlite3", "response cache (SQLite)"),
    ("aiohttp", "aiohttp (HTTP client)"),
    ("yarl", "aiohttp (HTTP client)"),
    ("multidict", "aiohttp (HTTP client)"),
    ("orjson", "orjson (encode, decode)"),
    ("json/", "json (cache keys, cache values, record lines)"),
    ("asyncio/", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
    ("rich/", "rich (progress display)"),
    ("factory/teachers/", "factory/teachers (request, parse)"),
    ("factory/limiter", "factory/limiter"),
    ("factory/asker", "factory/asker (cache, budget, cost)"),
    ("factory/decide", "factory/decide (checks, records)"),
    ("factory/", "factory (rest: dispatch, store, prompts, records, pricing)"),
    ("quality_checks/", "quality_checks (empty, truncated, refusal, dedup)"),
    ("apprentice/", "apprentice (hashing, responses)"),
    ("hashlib", "apprentice (hashing, responses)"),
)


def area_of(path: str, name: str) -> str | None:
    where = f"{path}:{name}"
    return next((label for pattern, label in AREAS if pattern in where), None)


def own_times(prof: Path) -> dict[tuple[str, ...], tuple[str, int, float]]:
    """Each function's (area, calls, own seconds). A built-in (isinstance, dict.get, ...) with no area of its
    own is split by caller and counts in each caller's area, with the time spent in it on that caller's behalf."""
    entries: dict[tuple[str, ...], tuple[str, int, float]] = {}
    for (path, line, name), (_, calls, seconds, _, callers) in pstats.Stats(str(prof)).stats.items():  # type: ignore[attr-defined]
        area = area_of(path, name)
        if area is None and path == "~" and callers:
            for (caller_path, caller_line, caller_name), timing in callers.items():
                key = (path, name, caller_path, str(caller_line), caller_name)
                entries[key] = (area_of(caller_path, caller_name) or OTHER, timing[1], timing[2])
        else:
            entries[(path, str(line), name)] = (area or OTHER, calls, seconds)
    return entries


OTHER = "other (standard library, pydantic, ...)"


def profile(args: argparse.Namespace, workdir: Path) -> list[str]:
    """Where the raw factory's CPU per request goes: cProfile (in CPU time) of a run of `requests` requests minus
    that of a run of 1, for the functions called more often in the longer run (which leaves out the start-up),
    each function's own time by area, in ms per request. cProfile adds its own cost to every call, so the
    shares say more than the sums."""
    server, url = start_server(args.latency, args.provider)
    by_count: dict[int, dict[tuple[str, ...], tuple[str, int, float]]] = {}
    try:
        for count in (1, args.requests):
            recipe = write_inputs(workdir, url, count, args.concurrency, f"profile{count}", "raw", args.provider)
            out = workdir / f"raw{count}.prof"
            env = dict(os.environ, OPENAI_API_KEY="sk-bench", ANTHROPIC_API_KEY="sk-bench")
            run_measured([PY, "-c", PROFILED, str(out), str(recipe)], env)
            by_count[count] = own_times(out)
    finally:
        server.terminate()
        server.wait()
    # Only functions called more often in the longer run: what is done once (imports, set-up) is left out whatever
    # its timing did between the two runs (imports alone vary by a few tenths of a second on a shared machine).
    areas: dict[str, float] = {}
    for key, (area, calls, seconds) in by_count[args.requests].items():
        _, calls_before, seconds_before = by_count[1].get(key, (area, 0, 0.0))
        if calls > calls_before:
            areas[area] = areas.get(area, 0.0) + seconds - seconds_before
    total = sum(areas.values())
    per = 1000 / (args.requests - 1)
    rows = [f"cProfile (CPU time) of the raw factory: a run of {args.requests} requests minus a run of 1, the "
            f"functions called more often in the longer run, each one's own time by area, ms per request (profiled: "
            f"{per * total:.2f} ms of CPU per request)", "",
            "| area | ms per request (profiled) | share |", "|---|---|---|"]
    for area, seconds in sorted(areas.items(), key=lambda item: -item[1]):
        rows.append(f"| {area} | {per * seconds:.3f} | {100 * seconds / total:.0f} % |")
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
    parser.add_argument("--profile", action="store_true", help="also profile the raw factory (cProfile), by area")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="openai",
                        help="the API the three clients speak (the fake serves both)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lines = [
            f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/factory_overhead.py'] + sys.argv[1:])}`",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.platform()}",
            f"Setup: {args.provider}, {args.requests} requests, concurrency {args.concurrency}, server latency {args.latency * 1000:.0f} ms, "
            f"{args.rounds} rounds, the order of the clients rotating",
            "",
        ]
        if not args.no_throughput:
            lines += throughput(args, workdir)
        if args.profile:
            lines += [""] + profile(args, workdir)
        if args.memory:
            lines += ["", "Peak RSS of `python -m factory generate` (server latency 0):", ""] + memory(args, workdir)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
