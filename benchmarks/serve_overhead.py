"""What the serve router adds in front of a fast backend: the same load generator calls a fake OpenAI server
directly, then through `python -m serve` (routing mode student, the served log written for every request),
side by side, rounds alternating.

    .venv/bin/python benchmarks/serve_overhead.py                          # 64 connections, 2,000 requests
    .venv/bin/python benchmarks/serve_overhead.py --latency 0 --rounds 3   # a backend that answers at once
    .venv/bin/python benchmarks/serve_overhead.py --cpus 0,1               # pin every process to these cores
    .venv/bin/python benchmarks/serve_overhead.py --loops asyncio,uvloop   # a router on each loop, same rounds
    .venv/bin/python benchmarks/serve_overhead.py --rate 1000              # open loop: 1,000 requests a second

Three processes: the fake server (`python -m fakes`), the router (`python -m serve`), and the load generator
(aiohttp, `--connections` requests in flight, each request timed). The added latency is the median of the routed
requests' latencies minus the median of the direct ones; throughput is requests over the load's wall time. The
router's CPU per request is its process CPU (utime + stime from /proc) over the routed requests of a round,
after a warm-up round that is not counted.
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

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = sys.executable

LOAD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import aiohttp
    url, count, connections, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    async def main():
        latencies = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
            async def send(i, start):
                body = {"model": "student", "messages": [{"role": "user", "content": f"question number {i}"}],
                        "max_tokens": 64}
                async with session.post(url, json=body, headers={"Authorization": "Bearer sk-bench"}) as reply:
                    await reply.read()
                    assert reply.status == 200, reply.status
                latencies.append(time.perf_counter() - start)
            if rate:  # open loop: request i is due at i / rate, timed from then (a wait for a connection counts)
                async def due(i, at):
                    await asyncio.sleep(max(0.0, at - time.perf_counter()))
                    await send(i, at)
                start = time.perf_counter()
                await asyncio.gather(*(due(i, start + i / rate) for i in range(count)))
            else:  # closed loop: each connection sends its next request when the last is answered
                queue = iter(range(count))
                async def worker():
                    for i in queue:
                        await send(i, time.perf_counter())
                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(connections)))
            wall = time.perf_counter() - start
        print(json.dumps({"wall": wall, "latencies": latencies}))
    asyncio.run(main())
    """
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(command: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def start_fake(latency: float, cpus: str | None) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(pinned([PY, "-m", "fakes", "--latency", str(latency), "--api-key", "sk-bench"], cpus),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = process.stdout.readline()
    return process, int(line.split()[1])


def start_router(fake_port: int, folder: Path, cpus: str | None, profile: Path | None = None,
                 event_loop: str = "auto") -> tuple[subprocess.Popen, str]:
    recipe = folder / f"serve-{event_loop}.yaml"
    recipe.write_text(json.dumps({"serve": {
        "port": 0, "log_dir": str(folder / f"served-{event_loop}"), "routing": {"mode": "student"},
        "event_loop": event_loop,
        "api_keys_env": "BENCH_KEYS",
        "student": {"provider": "openai", "model": "student", "base_url": f"http://127.0.0.1:{fake_port}/v1",
                    "api_key_env": "BENCH_BACKEND_KEY", "max_concurrency": 256,
                    "params": {"temperature": 0.0, "max_tokens": 64}}}}), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_KEYS="sk-bench", BENCH_BACKEND_KEY="sk-bench")
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    process = subprocess.Popen(pinned([PY, *profiler, "-m", "serve", str(recipe)], cpus), cwd=REPO,
                               stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while "serving" not in line:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise SystemExit("the router exited before it served")
    return process, line.split(" on ", 1)[1].strip()


def load(url: str, count: int, connections: int, cpus: str | None, rate: float = 0.0) -> dict:
    done = subprocess.run(pinned([PY, "-c", LOAD, url, str(count), str(connections), str(rate)], cpus),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def routing_cpu(folder: Path, count: int = 20_000) -> dict[str, float]:
    """CPU µs per request of the router's own work, in this process, with no network: the request parsed, the
    routing decided (canary and shadow draws, the cascade's threshold), the log line written, the response body
    built; the backend's answer is a ready-made one."""
    import asyncio

    from serve.app import ServeApp, parse_chat
    from serve.backends import Answer
    from serve.config import ServeConfig

    os.environ.setdefault("BENCH_BACKEND_KEY", "sk-bench")
    backend = {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "BENCH_BACKEND_KEY"}
    config = ServeConfig.model_validate({"log_dir": str(folder / "micro"), "student": backend, "teacher": backend,
                                         "routing": {"mode": "cascade", "threshold": -0.5, "canary": 0.05}})
    app = ServeApp(config)
    body = {"model": "apprentice", "messages": [{"role": "user", "content": "question number 1"}], "max_tokens": 64}

    async def run() -> dict[str, float]:
        from factory.served_log import ServedLog
        from serve.metrics import Metrics
        from serve.router import Router
        from serve.backends import Backend

        student, teacher = Backend("student", config.student), Backend("teacher", config.teacher)

        async def ready(*args: object) -> Answer:
            return Answer(["Paris"], ["stop"], [-0.1], {"input_tokens": 5, "output_tokens": 2}, 0.0)

        student.answer = teacher.answer = ready  # type: ignore[method-assign]
        router = Router(config, student, teacher, ServedLog(folder / "micro", 64 << 20), Metrics(config.alarm))
        app.router = router
        start = time.process_time()
        for _ in range(count):
            chat, _, _ = parse_chat(orjson.loads(orjson.dumps(body)), config)
            served = await router.complete(chat)
            orjson.dumps(app._completion(served))
        total = time.process_time() - start
        start = time.process_time()
        for _ in range(count):
            router.log.write({"id": "x" * 32, "prompt": body["messages"], "completion": [
                {"role": "assistant", "content": "Paris"}], "answered_by": "student", "confidence": -0.1})
        log = time.process_time() - start
        router.log.close()
        return {"routing_and_logging_us": 1e6 * total / count, "log_line_us": 1e6 * log / count}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.02, help="the fake backend's seconds per answer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", default=None, help="taskset -c list for every process, e.g. 0,1")
    parser.add_argument("--profile", action="store_true", help="run the router under cProfile; print its top functions")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: send this many requests a second, evenly spaced, each timed from when it was "
                             "due (at most --connections in flight); 0 (default): closed loop, as fast as answered")
    parser.add_argument("--loops", default="auto",
                        help="serve.event_loop of the routers to compare, comma-separated (auto, uvloop, asyncio): "
                             "one router each, all measured in the same rounds")
    args = parser.parse_args()
    loops = args.loops.split(",")

    fake, port = start_fake(args.latency, args.cpus)
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    profile = folder / "router.prof" if args.profile else None
    routers = {}  # path name → (router process or None, URL)
    routers["direct"] = (None, f"http://127.0.0.1:{port}/v1/chat/completions")
    try:
        for loop in loops:
            router, base_url = start_router(port, folder, args.cpus, profile if loop == loops[0] else None, loop)
            routers["routed" if len(loops) == 1 else f"routed ({loop})"] = (router, f"{base_url}/chat/completions")
        rows: dict[str, list[dict]] = {name: [] for name in routers}
        for _, url in routers.values():  # warm-up: imports, connections
            load(url, min(args.requests, 500), args.connections, args.cpus)
        names = list(routers)
        for round_ in range(args.rounds):
            shift = round_ % len(names)  # each path goes first in turn
            for name in names[shift:] + names[:shift]:
                router, url = routers[name]
                watched = router or routers[names[1]][0]
                before = cpu_seconds(watched.pid), cpu_seconds(fake.pid)
                result = load(url, args.requests, args.connections, args.cpus, args.rate)
                after = cpu_seconds(watched.pid), cpu_seconds(fake.pid)
                result["router_cpu"] = after[0] - before[0]
                result["fake_cpu"] = after[1] - before[1]
                rows[name].append(result)
    finally:
        for process in [router for router, _ in routers.values() if router is not None] + [fake]:
            process.terminate()
            process.wait(30)
    logged = sum(1 for path in folder.glob("served-*/served-*.jsonl") for _ in path.open(encoding="utf-8"))
    report(args, rows, logged)
    micro = routing_cpu(folder)
    print(f"the router's own CPU per request, in process, no network: routing and logging "
          f"{micro['routing_and_logging_us']:.1f} µs (parse, route, log line, response body), of which the log "
          f"line {micro['log_line_us']:.1f} µs")
    if profile is not None:
        print()
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)


def report(args: argparse.Namespace, rows: dict[str, list[dict]], logged: int) -> None:
    def p(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}; cpus {args.cpus or 'any'}; load average {os.getloadavg()[0]:.2f}")
    print(f"command: {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}")
    offered = f"open loop at {args.rate:g} requests/s" if args.rate else "closed loop"
    print(f"{offered}; {args.requests} requests a round, {args.connections} connections, "
          f"backend latency {args.latency} s, "
          f"{args.rounds} rounds; {logged} lines in the served log (warm-up included)")
    print()
    print("| path | requests/s (median) | p50 ms | p90 ms | p99 ms | router CPU ms per request | "
          "backend CPU ms per request |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for name, results in rows.items():  # the router's CPU is counted on the routed paths only
        rate = statistics.median(args.requests / r["wall"] for r in results)
        lat = [v for r in results for v in r["latencies"]]
        router_ms = statistics.median(1000 * r["router_cpu"] / args.requests for r in results)
        fake_ms = statistics.median(1000 * r["fake_cpu"] / args.requests for r in results)
        summary[name] = (rate, p(lat, 0.5) * 1000)
        print(f"| {name} | {rate:.1f} | {p(lat, 0.5) * 1000:.2f} | {p(lat, 0.9) * 1000:.2f} | "
              f"{p(lat, 0.99) * 1000:.2f} | {router_ms if name != 'direct' else 0:.3f} | {fake_ms:.3f} |")
    print()
    direct_rate, direct_p50 = summary.pop("direct")
    for name, (routed_rate, routed_p50) in summary.items():
        print(f"{name}: added p50 latency: {routed_p50 - direct_p50:.2f} ms; throughput routed ÷ direct: "
              f"{routed_rate / direct_rate:.2f}")
    for name, results in rows.items():
        print(f"per round {name} req/s: " + ", ".join(f"{args.requests / r['wall']:.1f}" for r in results))


if __name__ == "__main__":
    main()
