"""The factory next to its peers: bespokelabs-curator, distilabel and a plain AsyncOpenAI loop.

All four ask the same loopback fake server (benchmarks/peers/fake_server.py: the project's
`fakes.FakeServer` in its own process, with a clock on its answers; a fresh one per run)
for the same chat completions: model gpt-4o-mini, one user message "question number <i>", temperature
0.8, max_tokens 64, at most `--concurrency` requests in flight (the factory: `teacher.max_concurrency`;
the plain loop: a semaphore; curator: `max_concurrent_requests`; distilabel has no such setting: its
`input_batch_size`, one batch in flight at a time). Each tool runs as its own process, from its own
venv, one at a time, in an order that rotates every round; figures are medians over the rounds. The
drivers are in benchmarks/peers/; results and their reading in benchmarks/results/peers.md.

    .venv/bin/python benchmarks/peers.py --wait-quiet 0.8     # install the peers if needed, measure
    .venv/bin/python benchmarks/peers.py --requests 200 --rounds 1 --limited-requests 500 --rpm 300 \
        --limited-rounds 1                                      # smoke run, ~5 min

Peers are installed from PyPI into `benchmarks/.venvs/<tool>/` (git-ignored) at the pinned versions
below; the factory and the plain loop use the repository's `.venv`. Nothing leaves the machine: curator's
telemetry is off (TELEMETRY_ENABLED=false), litellm uses its bundled price map
(LITELLM_LOCAL_MODEL_COST_MAP=True), Hugging Face is offline (HF_HUB_OFFLINE=1), and tiktoken's BPE
tables, which curator needs, come from the `bpe-openai` wheel (benchmarks/peers/tiktoken_offline.py).

Measured per run, on the tool's process and the processes it starts (never the fake server):
  - requests/s server-side: 200 answers / (first request in to last answer out), the same clock for
    every tool; end-to-end requests/s over the whole process's wall time; and the wall time outside the
    request phase (interpreter start, imports, set-up, writing results, exit);
  - CPU seconds (user + sys, from wait4, which includes the children the tool reaped) per 1,000 requests,
    whole process, and again less the CPU of a process that only imports what the run imports;
  - memory: ru_maxrss (the largest single process), and the peak of the summed PSS of the process tree,
    sampled every 0.2 s with psutil (shared pages counted once; differs from ru_maxrss only for
    tools that start processes);
  - under an enforced rate limit (`--rpm`; a fresh server per run, so every tool starts from a full
    bucket): the 429s the server sent, failed requests, and the share of the limit achieved:
    answered requests / (rpm * (1 + request phase / 60 s)), the most a token bucket of `rpm` per minute
    that starts full can admit in that time. The server also enforces a token limit (`--tpm`, far from
    binding) because OpenAI's responses always carry both headers and curator reads both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from factory_overhead import write_inputs  # the same recipe as that benchmark (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
DRIVERS = HERE / "peers"
TIKTOKEN_CACHE = VENVS / "tiktoken-cache"
PY = sys.executable

# name → pip requirements of its venv, and the distribution whose version the results name
PEER_VENVS = {
    "curator": (["bespokelabs-curator==0.1.31", "bpe-openai==0.1.4"], "bespokelabs-curator"),
    # distilabel 1.5.3 imports `requests` without declaring it (huggingface-hub >= 1.0 dropped it)
    "distilabel": (["distilabel[openai]==1.5.3", "requests"], "distilabel"),
}
TOOLS = ("factory", "plain", "curator", "distilabel")
LABELS = {
    "factory": "`python -m factory generate`",
    "plain": "plain `AsyncOpenAI` + semaphore",
    "curator": "bespokelabs-curator (`curator.LLM`, openai backend)",
    "distilabel": "distilabel (`TextGeneration` + `OpenAILLM`)",
}
IMPORTS = {
    "factory": "import factory.__main__, factory.run, factory.recipe, factory.teachers.openai, openai",
    "plain": "import asyncio, openai",
    "curator": ("from bespokelabs import curator; "
                "import bespokelabs.curator.request_processor.online.openai_online_request_processor"),
    "distilabel": ("from distilabel.models.llms import OpenAILLM; from distilabel.pipeline import Pipeline; "
                   "from distilabel.steps import LoadDataFromDicts; from distilabel.steps.tasks import TextGeneration"),
}


LOADS: list[float] = []  # the 1-minute load average as each measured run starts


def venv_python(tool: str) -> Path:
    if tool in ("factory", "plain"):
        return REPO / ".venv" / "bin" / "python"
    return VENVS / tool / "bin" / "python"


# ---------------------------------------------------------------------------------------------------
# setup


def installed_version(python: Path, dist: str) -> str | None:
    probe = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venvs(tools: list[str]) -> None:
    """Create each peer's venv and pip-install its pinned requirements, unless already there."""
    for tool in tools:
        if tool not in PEER_VENVS:
            continue
        requirements, dist = PEER_VENVS[tool]
        python = venv_python(tool)
        wanted = next(r.split("==")[1] for r in requirements if r.split("==")[0].split("[")[0] == dist)
        if python.exists() and installed_version(python, dist) == wanted \
                and all(installed_version(python, r.split("==")[0].split("[")[0]) for r in requirements):
            continue
        print(f"installing {tool} into {python.parents[1].relative_to(REPO)} (a few minutes)", flush=True)
        if not python.exists():
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(python.parents[1])], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    if "curator" in tools:
        names = ("cl100k_base.tiktoken", "o200k_base.tiktoken")
        if not TIKTOKEN_CACHE.is_dir() or len(list(TIKTOKEN_CACHE.iterdir())) < len(names):
            subprocess.run([str(venv_python("curator")), str(DRIVERS / "tiktoken_offline.py")], check=True,
                           env=dict(os.environ, TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE)))


def versions(tools: list[str]) -> dict[str, str]:
    found = {}
    for tool in tools:
        python = venv_python(tool)
        # the openai SDK (3.x) sends through httpx2, not httpx
        names = {"factory": ["openai", "httpx2"], "plain": ["openai", "httpx2"],
                 "curator": ["bespokelabs-curator", "aiohttp", "litellm", "tiktoken"],
                 "distilabel": ["distilabel", "openai", "httpx2"]}[tool]
        found[tool] = ", ".join(f"{name} {installed_version(python, name)}" for name in names)
    return found


def tool_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return dict(
        env,
        # compiled bytecode is cached for every tool alike (the editable-installed factory has none of
        # its own otherwise, the peers' wheels have theirs), outside the work tree; a warm-up run fills it
        PYTHONPYCACHEPREFIX=str(VENVS / "pycache"),
        OPENAI_API_KEY="sk-bench",
        TELEMETRY_ENABLED="false",            # curator's posthog telemetry
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # litellm would fetch its price map from GitHub
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        HF_HOME=str(workdir / "hf"),
        CURATOR_CACHE_DIR=str(workdir / "curator-cache"),
        TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE),
        # distilabel logs every HTTP request at INFO (its default) through rich; WARNING spares it that
        # cost (measured: about a fifth of its CPU), which we do not want to count against it
        DISTILABEL_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )


# ---------------------------------------------------------------------------------------------------
# measuring one process


@dataclass
class Measured:
    stdout: str
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    peak_pss_mib: float
    processes: int


def sample_tree(pid: int, stop: threading.Event, out: dict) -> None:
    """Peak of the summed PSS (RSS where PSS is unreadable) of `pid` and its descendants, every 0.2 s."""
    peak, seen = 0.0, set()
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        total = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            break
        for proc in procs:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
                seen.add(proc.pid)
            except psutil.Error:
                pass
        peak = max(peak, total / 2**20)
        stop.wait(0.2)
    out["peak_pss_mib"] = peak
    out["processes"] = len(seen)


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 1800) -> Measured:
    with open(log, "ab") as err, tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
        stop, sampled = threading.Event(), {}
        sampler = threading.Thread(target=sample_tree, args=(proc.pid, stop, sampled), daemon=True)
        sampler.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        killer.cancel()
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    return Measured(stdout, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                    sampled.get("peak_pss_mib", 0.0), sampled.get("processes", 1))


# ---------------------------------------------------------------------------------------------------
# the fake server


class Server:
    """benchmarks/peers/fake_server.py in its own process: the project's fake server with a clock."""

    def __init__(self, latency: float, rpm: int | None = None, tpm: int | None = None) -> None:
        cmd = [PY, str(DRIVERS / "fake_server.py"), "--latency", str(latency)]
        if rpm:
            cmd += ["--rpm", str(rpm)]
        if tpm:
            cmd += ["--tpm", str(tpm)]
        self.latency = latency
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            self.proc.kill()
            raise SystemExit(f"fake server did not start: {line} {self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{line[1]}/v1"

    def stop(self) -> dict:
        """Stop it; what it saw: total, by_status (str keys), answered, span_s."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise SystemExit(f"fake server failed ({self.proc.returncode}): {err[-2000:]}")
        return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------
# one run of one tool


@dataclass
class Result:
    tool: str
    requests: int
    call_s: float          # the driver's timer around the tool's generate call (factory: manifest elapsed_s)
    ok: int
    failed: int
    m: Measured
    server: dict
    latency: float
    extra: dict = field(default_factory=dict)

    @property
    def phase_s(self) -> float:
        """The server's view of the request phase: first request in to last answer out."""
        return self.server["span_s"] + self.latency

    @property
    def rate(self) -> float:
        return self.server["answered"] / self.phase_s

    @property
    def e2e_rate(self) -> float:
        return self.ok / self.m.wall_s

    @property
    def too_many(self) -> int:
        return self.server["by_status"].get("429", 0)


def run_tool(tool: str, requests: int, args: argparse.Namespace, workdir: Path, rpm: int | None) -> Result:
    """One run against a fresh fake server (rate-limited when `rpm` is given)."""
    workdir.mkdir(parents=True)
    env = tool_env(workdir)
    python = str(venv_python(tool))
    log = args.logs / f"{tool}.log"
    server = Server(args.latency, rpm=rpm, tpm=args.tpm if rpm else None)
    LOADS.append(os.getloadavg()[0])
    extra: dict = {}
    try:
        common = ["--base-url", server.url, "--requests", str(requests), "--concurrency", str(args.concurrency)]
        if tool == "factory":
            recipe = write_inputs(workdir, server.url, requests, args.concurrency, "factory")
            m = run_measured([python, "-m", "factory", "generate", str(recipe)], env, log)
        else:
            if tool == "plain":
                cmd = [python, str(DRIVERS / "plain_openai.py"), *common]
            elif tool == "curator":
                cmd = [python, str(DRIVERS / "curator_driver.py"), *common, "--workdir", str(workdir / "curator")]
                if not rpm:
                    # No rate-limit headers from the server: curator would fall back to its defaults
                    # (200 rpm; 100,000 tpm at ~4,100 estimated tokens a request); a user lifts them.
                    cmd += ["--rpm", "100000000", "--tpm", "100000000000"]
            else:
                cmd = [python, str(DRIVERS / "distilabel_driver.py"), *common, "--workdir", str(workdir / "distilabel")]
            m = run_measured(cmd, env, log)
    finally:
        seen = server.stop()
    if tool == "factory":
        manifest = json.loads((workdir / "run-factory" / "manifest.json").read_text())
        counts = manifest["counts"]
        call_s, ok, failed = manifest["this_run"]["elapsed_s"], counts["accepted"] + counts["rejected"], counts["failed"]
    else:
        out = json.loads(m.stdout.strip().splitlines()[-1])
        call_s, ok, failed = out["loop_s"], out["ok"], out["failed"]
        if out.get("request_phase_s") is not None:
            extra["own_phase_s"] = out["request_phase_s"]
    return Result(tool, requests, call_s, ok, failed, m, seen, args.latency, extra)


def startup(tool: str, workdir: Path, args: argparse.Namespace) -> Measured:
    """A process that only imports what the tool's run imports: its start-up cost."""
    workdir.mkdir(parents=True)
    return run_measured([str(venv_python(tool)), "-c", IMPORTS[tool]], tool_env(workdir), args.logs / f"{tool}.log")


# ---------------------------------------------------------------------------------------------------
# the scenarios


def rotated(tools: list[str], round_no: int) -> list[str]:
    k = round_no % len(tools)
    return tools[k:] + tools[:k]


def med(values: list[float]) -> float:
    return statistics.median(values)


def warm_up(args: argparse.Namespace, tools: list[str], workdir: Path) -> None:
    """One small untimed run of each tool: bytecode compiled and cached, files in the page cache."""
    for tool in tools:
        run_tool(tool, 2 * args.concurrency, args, workdir / f"w-{tool}", rpm=None)
        print(f"warmed up {tool}", flush=True)


def throughput(args: argparse.Namespace, tools: list[str], workdir: Path) -> list[str]:
    results: dict[str, list[Result]] = {t: [] for t in tools}
    starts: dict[str, list[Measured]] = {t: [] for t in tools}
    for round_no in range(args.rounds):
        for tool in rotated(tools, round_no):
            starts[tool].append(startup(tool, workdir / f"s{round_no}-{tool}", args))
            r = run_tool(tool, args.requests, args, workdir / f"t{round_no}-{tool}", rpm=None)
            if r.ok != args.requests or r.server["answered"] != args.requests:
                raise SystemExit(f"{tool}: {r.ok} of {args.requests} answered ({r.server}) in the throughput run")
            results[tool].append(r)
            print(f"throughput round {round_no + 1} {tool:>10}: {r.rate:6.1f} req/s (server), "
                  f"{r.e2e_rate:6.1f} end-to-end, call {r.call_s:5.1f} s, wall {r.m.wall_s:5.1f} s, "
                  f"{r.m.cpu_s:5.2f} CPU s (import {starts[tool][-1].cpu_s:.2f}), "
                  f"ru_maxrss {r.m.maxrss_mib:6.1f} MiB, peak PSS {r.m.peak_pss_mib:6.1f} MiB, "
                  f"{r.m.processes} process(es) {r.extra or ''}", flush=True)
    base = med([r.rate for r in results[tools[0]]])
    n = args.requests
    rows = [
        f"{n:,} requests, concurrency {args.concurrency}, server latency {args.latency * 1000:.0f} ms "
        f"(ceiling {args.concurrency / args.latency:.0f} req/s), no rate limit; medians of {args.rounds} rounds.",
        "",
        "| tool | requests/s (server-side, request phase) | ratio to the factory | requests/s end to end "
        "| process wall s outside the request phase | CPU s per 1,000 requests | … less import CPU "
        "| import: wall s / CPU s | ru_maxrss MiB (largest process) | peak PSS MiB (process tree) | processes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tool in tools:
        rs, ss = results[tool], starts[tool]
        rate = med([r.rate for r in rs])
        cpu = med([r.m.cpu_s for r in rs])
        import_cpu = med([s.cpu_s for s in ss])
        rows.append(
            f"| {LABELS[tool]} | {rate:.1f} | {rate / base:.2f} | {med([r.e2e_rate for r in rs]):.1f} "
            f"| {med([r.m.wall_s - r.phase_s for r in rs]):.1f} "
            f"| {1000 * cpu / n:.2f} | {1000 * (cpu - import_cpu) / n:.2f} "
            f"| {med([s.wall_s for s in ss]):.2f} / {import_cpu:.2f} "
            f"| {med([r.m.maxrss_mib for r in rs]):.0f} | {med([r.m.peak_pss_mib for r in rs]):.0f} "
            f"| {max(r.m.processes for r in rs)} |"
        )
    rows += ["", "Per round, requests/s (server-side): " + "; ".join(
        f"{t} {', '.join(f'{r.rate:.1f}' for r in results[t])}" for t in tools) + "."]
    rows += ["Per round, seconds inside the tool's generate call (driver timer; factory: manifest `elapsed_s`): "
             + "; ".join(f"{t} {', '.join(f'{r.call_s:.1f}' for r in results[t])}" for t in tools) + "."]
    own = [r.extra["own_phase_s"] for t in tools for r in results[t] if "own_phase_s" in r.extra]
    if own:
        rows += [f"curator's own tracker times its request phase at {', '.join(f'{x:.1f}' for x in own)} s "
                 f"({', '.join(f'{n / x:.1f}' for x in own)} requests/s)."]
    return rows


def share(r: Result, rpm: int) -> float:
    """Answered requests over the most a full-at-start bucket of `rpm` admits in the request phase."""
    return r.server["answered"] / (rpm * (1 + r.phase_s / 60))


def limited(args: argparse.Namespace, tools: list[str], workdir: Path) -> list[str]:
    results: dict[str, list[Result]] = {t: [] for t in tools}
    rpm, n = args.rpm, args.limited_requests
    for round_no in range(args.limited_rounds):
        for tool in rotated(tools, round_no):
            r = run_tool(tool, n, args, workdir / f"l{round_no}-{tool}", rpm=rpm)
            results[tool].append(r)
            print(f"rate-limited round {round_no + 1} {tool:>10}: {r.ok} ok, {r.failed} failed, request phase "
                  f"{r.phase_s:.1f} s (call {r.call_s:.1f} s), 429s {r.too_many}, server saw {r.server['total']}, "
                  f"share {share(r, rpm):.2f}, {r.m.cpu_s:.2f} CPU s", flush=True)
    ideal = 60 * max(0, n - rpm) / rpm + args.latency
    rows = [
        f"{n:,} requests, concurrency {args.concurrency}, latency {args.latency * 1000:.0f} ms, server limit "
        f"{rpm:,} requests/min (a token bucket that starts full, like the providers'; also {args.tpm:,} tokens/min, "
        f"never binding); a fresh server per run; a perfect client needs ≈{ideal:.0f} s; "
        f"medians of {args.limited_rounds} rounds.",
        "",
        "| tool | request phase s (server-side) | answered | failed | 429s received | requests the server saw "
        "| share of the limit achieved | CPU s, whole process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tool in tools:
        rs = results[tool]
        rows.append(
            f"| {LABELS[tool]} | {med([r.phase_s for r in rs]):.1f} | {med([r.ok for r in rs]):.0f} "
            f"| {med([r.failed for r in rs]):.0f} | {med([r.too_many for r in rs]):.0f} "
            f"| {med([r.server['total'] for r in rs]):.0f} | {med([share(r, rpm) for r in rs]):.2f} "
            f"| {med([r.m.cpu_s for r in rs]):.2f} |"
        )
    rows += ["", "Per round (request phase s / 429s / failed): " + "; ".join(
        f"{t} " + ", ".join(f"{r.phase_s:.1f} / {r.too_many} / {r.failed}" for r in results[t])
        for t in tools) + "."]
    return rows


def wait_quiet(limit: float, patience_s: float) -> str:
    deadline = time.time() + patience_s
    while True:
        load = os.getloadavg()[0]
        if load < limit or time.time() >= deadline:
            return f"{load:.2f}" + ("" if load < limit else f" (never below {limit} in {patience_s / 60:.0f} min)")
        print(f"1-minute load {load:.2f} ≥ {limit}; waiting", flush=True)
        time.sleep(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="per throughput run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--limited-requests", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=1200, help="the fake server's enforced requests/min")
    parser.add_argument("--tpm", type=int, default=10_000_000, help="the fake server's enforced tokens/min")
    parser.add_argument("--limited-rounds", type=int, default=2)
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, the first is the reference")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--no-limited", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                        help="first wait (up to 40 min) until the 1-minute load average is below LOAD")
    parser.add_argument("--logs", type=Path, default=None, help="keep the tools' stderr here (default: a temp dir)")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        raise SystemExit(f"unknown tools: {sorted(unknown)}")
    ensure_venvs(tools)
    load = wait_quiet(args.wait_quiet, 40 * 60) if args.wait_quiet else f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        workdir = Path(tmp)
        args.logs = args.logs or workdir / "logs"
        args.logs.mkdir(parents=True, exist_ok=True)
        found = versions(tools)
        lines = [
            f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/peers.py'] + sys.argv[1:])}`",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, {platform.platform()}",
            f"1-minute load average at the start: {load}",
            "Versions: " + "; ".join(f"{t}: {v}" for t, v in found.items()),
            "",
        ]
        began = time.time()
        warm_up(args, tools, workdir / "warm-up")
        LOADS.clear()
        if not args.no_throughput:
            lines += ["### Throughput", ""] + throughput(args, tools, workdir / "throughput") + [""]
        if not args.no_limited:
            lines += ["### Under an enforced rate limit", ""] + limited(args, tools, workdir / "limited") + [""]
        lines.append(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}; as the measured runs started: "
                     f"median {med(LOADS):.2f}, max {max(LOADS):.2f}; took {(time.time() - began) / 60:.1f} min.")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
