"""Generation on Ray (`factory.runner: ray`): the prompts split into shards, each made by the factory's own
run in a Ray task, then merged.

    driver: source ─▶ split by a hash of prompt id (factory/shards.py) ─▶ one Ray task per shard, `workers`
    at a time ─▶ each: Run(shard config) into run_dir/shards/0000k/ ─▶ merge (run-wide checks across shards)
    ─▶ run_dir/{accepted,rejected,failed}.jsonl and manifest.json

A shard is a run directory like any other: its own lock, cache, records and manifest, so the resume
guarantees of a run hold for each one. Killing the driver kills its tasks (Ray ends the tasks of a driver
that died); a task whose worker died is restarted by Ray (`max_restarts`) and resumes its shard. Running
the same command again makes only what is missing, answering from each shard's cache what was paid.

The teacher's rate limits are shared: each task's limiter takes `1 / (tasks running)` of the recipe's caps
and of the limits the provider's headers report (factory/limiter.py, `share`; the driver writes the share
to shards/share as tasks end, and the workers follow it), so W workers send what one process would.
`budget_usd` is split between the shards by their prompt counts.

A teacher loaded in the process (`provider: local` or `vllm`) is loaded once per worker, not once per shard:
each worker is a Ray actor (`TeacherEngine`, `ray.gpus_per_worker` GPUs) that builds the teacher as the
factory does (`make_teacher`) and runs the shards given to it one after another, in one event loop, each with
the factory's own `Run` handed that teacher. A killed actor is restarted by Ray (`max_restarts`), loads the
teacher again and runs its shard again, which resumes from its own records and cache.

`ray` is imported inside `run_on_ray`, the one function that needs it (and in `TeacherEngine.run`, which runs
in a Ray actor): `python -m factory --help` and the local runner never load it.

Ctrl-C at the driver cancels the shards running: a task's run gets it as a Ctrl-C of its own; an engine's, as
the flag Ray raises for an actor's method, which the run reads every 0.1 s. Either run finishes the requests in
flight, writes its manifest as interrupted, and the driver merges what the shards made.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from apprentice.console import CommandConsole
from apprentice.errors import ApprenticeError, RecipeError
from quality_checks import build_checks

from .learnt_limits import exchange, exchange_pauses
from .pacing import RAMP_DOUBLING_S
from .lock import DirectoryInUse, DirectoryLock
from .progress import Counters
from .prompt_config import PromptsConfig
from .prompts import SourceEnv, check_prompts
from .recipe import IN_PROCESS, FactoryConfig, TeacherConfig
from .run import Run
from .run_report import RUN_LOG, RunResult, check_compatible, package_versions
from .shards import PROMPTS, SHARDS, merge_shards, merge_sidecars, shard_dir, split_prompts
from .sources import write_prompts
from .stats import compute_stats
from .store import read_manifest, replace_whole, write_manifest
from .teachers import Teacher, make_teacher

PROGRESS_EVERY_S = 30.0  # a line of figures from the shards' manifests (each run writes its own every 10 s)
SHARE = "share"  # in shards/: each worker's part of the rate limits now, 1 / the tasks running
SHARE_EVERY_S = 0.1  # how often a worker reads it, and what the workers learnt (shards/limits.json, pauses.json)
LOCK_WAIT_S = 60.0  # a task of a killed driver may still hold its shard's lock for a moment
WORKER_LOG = "worker.log"
ENGINE_CLOSE_S = 60.0  # a worker's teacher engine is given this long to shut down, then its actor is ended
# The worse status wins when the shards' statuses differ.
STATUS_ORDER = ("complete", "complete_with_failures", "interrupted", "budget_exhausted", "stopped")
SUMMED = ("cpu_s", "requests", "cache_hits", "resumed_records", "input_tokens", "output_tokens", "cached_input_tokens",
          "cache_write_tokens", "cost_usd", "retries", "rate_limited", "server_errors", "breaker_opened")


def run_shard(config: FactoryConfig, share: float, teacher: Teacher | None = None,
              loop: asyncio.AbstractEventLoop | None = None, ramp_delay_s: float = 0.0,
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """One shard, in a Ray worker: the factory's own run of the shard's prompts into the shard's directory.
    What it printed is in the shard's worker.log; its figures are in the shard's manifest.json. `teacher` and
    `loop`: a worker's teacher engine, loaded once, and the event loop it is bound to (TeacherEngine).
    `ramp_delay_s`: how long its limiters pace before ramping into the room the headers show (see _drive).
    `cancelled`: whether the driver cancelled this shard, where a cancel arrives as a flag (see TeacherEngine)."""
    started = time.time()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    with open(config.output_dir / WORKER_LOG, "a", encoding="utf-8") as log:
        console = Console(file=log, width=120, force_terminal=False, color_system=None)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                sharing = _run_sharing(Run(config, console=console, rate_share=share, teacher=teacher,
                                           ramp_delay_s=ramp_delay_s),
                                       config.output_dir.parent / SHARE, cancelled)
                result = asyncio.run(sharing) if loop is None else loop.run_until_complete(sharing)
                break
            except DirectoryInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
    return {"status": result.status, "message": result.message, "pid": os.getpid(), "started": started,
            "finished": time.time()}


async def _run_sharing(run: Run, share_file: Path, cancelled: Callable[[], bool] | None = None) -> RunResult:
    """The run, its limiters following the share the driver writes as the tasks running change (when a
    worker is done, the others take its part of the rate limits instead of leaving it unused), and the short
    windows every worker learnt (shards/limits.json: one worker's 429 teaches them all). When `cancelled()`
    turns true, the run stops as on a first Ctrl-C: it finishes the requests in flight and writes its manifest."""
    async def follow() -> None:
        while True:
            await asyncio.sleep(SHARE_EVERY_S)
            if cancelled is not None and not run.stop.stopping and cancelled():
                run.stop()
            try:
                share: float | None = float(share_file.read_text())
            except (OSError, ValueError):
                share = None
            for limiter in run.limiters:
                if share is not None and limiter.share != share:
                    limiter.set_share(share)
            try:
                exchange(share_file.parent, run.endpoint_limiters)
                exchange_pauses(share_file.parent, run.endpoint_limiters)
            except OSError:  # the shared folder is unwritable for a moment: the next round tries again
                pass

    follower = asyncio.create_task(follow())
    try:
        return await run.execute()
    finally:
        follower.cancel()


class TeacherEngine:
    """A Ray actor's body (`runner: ray` with provider local or vllm): the teacher built once, as the factory
    builds it, and the shards given to this worker run one after another with it. One event loop for the
    actor's life: a vLLM teacher is bound to the loop that first used it, and a local one keeps its batcher."""

    def __init__(self, teacher: TeacherConfig, share: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.teacher = make_teacher(teacher, share)

    def run(self, config: FactoryConfig, share: float, ramp_delay_s: float = 0.0) -> dict[str, Any]:
        # The driver's Ctrl-C cancels this method: Ray does not interrupt a running method of an actor (it
        # holds state), it raises a flag, which the run reads with its other shared state, every 0.1 s.
        import ray

        context = ray.get_runtime_context()
        return run_shard(config, share, self.teacher, self.loop, ramp_delay_s, cancelled=context.is_canceled)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.teacher.aclose())
        finally:
            self.loop.close()


def actor_options(settings: Any, max_restarts: int) -> dict[str, Any]:
    """Ray's options for one worker's TeacherEngine: its CPUs and GPUs, and restarts that run its shard again."""
    return {"num_cpus": settings.cpus_per_worker, "num_gpus": settings.gpus_per_worker or 0,
            "max_restarts": max_restarts, "max_task_retries": max_restarts}


def _write_share(shards_dir: Path, running: int) -> None:
    replace_whole(shards_dir / SHARE, f"{1.0 / running!r}")


def shard_config(config: FactoryConfig, index: int, prompts: int, total: int) -> FactoryConfig:
    """The recipe of one shard: its directory, its prompts file, its part of the budget; run locally."""
    directory = shard_dir(config.output_dir, index)
    budget = None if config.budget_usd is None else config.budget_usd * prompts / max(1, total)
    return config.model_copy(update={
        "output_dir": directory,
        "prompts": PromptsConfig(path=directory / PROMPTS, system=config.prompts.system),
        "runner": "local",
        "ray": None,
        "budget_usd": budget,
    })


def run_on_ray(config: FactoryConfig, *, limit: int | None = None, console: Console) -> RunResult:
    """`generate` with `runner: ray`, holding the run directory's lock throughout."""
    try:
        import ray  # the `ray` extra; only this runner needs it
    except ImportError:
        raise RecipeError("factory.runner: ray needs Ray: pip install 'apprentice[ray]' (or 'ray>=2.40'), "
                          "or set factory.runner: local") from None
    config = config.model_copy(update={"output_dir": config.output_dir.resolve()})
    with DirectoryLock(config.output_dir, "factory.output_dir"):
        return _drive(ray, config, limit, console)


def _drive(ray: Any, config: FactoryConfig, limit: int | None, console: Console) -> RunResult:
    started = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_dir = config.output_dir
    settings = config.ray
    assert settings is not None  # FactoryConfig fills it for runner: ray
    previous = check_compatible(run_dir, config)
    prompts_path = asyncio.run(write_prompts(config.prompts, SourceEnv(run_dir, console))).resolve()
    check_prompts(prompts_path, config.prompts.system)
    checks = build_checks(config.checks)  # for the merge; a bad check fails here, before anything is sent
    keys = {config.teacher.api_key_env} | {check.teacher.api_key_env for check in checks if check.teacher is not None}
    if isinstance(console, CommandConsole):  # a command's console keeps a transcript for run.log
        console.open_log(run_dir / RUN_LOG, keys)
    shards = settings.shard_count
    counts = split_prompts(prompts_path, run_dir, shards, config.prompts.system, limit)
    total = sum(counts)
    open_shards = [index for index, count in enumerate(counts) if count]
    workers = min(settings.workers, len(open_shards))
    share = 1.0 / workers
    in_process = config.teacher.provider in IN_PROCESS
    each = (f"one {config.teacher.provider} teacher engine per worker, {settings.gpus_per_worker:g} GPU(s) each"
            if in_process else f"each worker's share of the rate limits: 1/{workers}")
    console.print(f"[bold]ray[/]     {total:,} prompts in {shards} shard(s) ({escape(str(run_dir / 'shards'))}), "
                  f"{workers} at a time; {each}", highlight=False)
    started_ray = not ray.is_initialized()
    ray_at = time.monotonic()
    if started_ray:
        local = {} if settings.address else {"num_cpus": max(os.cpu_count() or 1,
                                                              int(workers * settings.cpus_per_worker + 0.999))}
        ray.init(address=settings.address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, **local)
    # The workers read the API keys the recipe names from their own environment: a local Ray started here
    # inherits the driver's; a cluster's nodes need them set. Sent with the tasks only when the recipe says so,
    # since Ray keeps a task's runtime_env in the cluster's metadata (secrets stay out of it by default).
    env_vars = ({name: os.environ[name] for name in sorted(keys) if name and name in os.environ}
                if settings.pass_keys else {})
    ray_start_s = time.monotonic() - ray_at
    runtime = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    engines: list[Any] = []
    if in_process:  # a teacher loaded in the process: one engine per worker (an actor), given shards in turn
        try:
            _check_gpus(ray, workers, settings.gpus_per_worker or 0.0)
        except RecipeError:
            if started_ray:
                ray.shutdown()
            raise
        engine = ray.remote(TeacherEngine).options(**actor_options(settings, settings.max_restarts), **runtime)
        engines = [engine.remote(config.teacher, share) for _ in range(workers)]
    task = ray.remote(run_shard).options(num_cpus=settings.cpus_per_worker, max_retries=settings.max_restarts,
                                         **runtime)
    idle = deque(engines)
    engine_of: dict[Any, Any] = {}  # a running shard's engine, back to idle when the shard is done

    def submit(shard: FactoryConfig) -> Any:
        # The first wave ramps in turn, RAMP_DOUBLING_S apart: a provider that enforces the minute in short
        # windows is then found by one worker's ramp (a 429 or two), and the others, still paced, learn it from
        # shards/limits.json before theirs begins. Ramping together, each paid its own 429s for it.
        delay = RAMP_DOUBLING_S * len(running) if len(results) + len(running) < workers else 0.0
        if not engines:
            return task.remote(shard, share, ramp_delay_s=delay)
        engine = idle.popleft()
        ref = engine.run.remote(shard, share, delay)
        engine_of[ref] = engine
        return ref

    results: dict[int, dict[str, Any]] = {}
    sharing = 0  # the tasks the share was last written for
    waiting = deque(open_shards)
    running: dict[Any, int] = {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                index = waiting.popleft()
                running[submit(shard_config(config, index, counts[index], total))] = index
            if running and len(running) != sharing:
                sharing = len(running)
                _write_share(run_dir / SHARDS, sharing)
            done, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_EVERY_S)
            if not done:
                console.print(_progress(run_dir, shards, total * config.samples_per_prompt), highlight=False)
            for ref in done:
                index = running.pop(ref)
                if ref in engine_of:
                    idle.append(engine_of.pop(ref))
                results[index] = _outcome(ray, ref, index, settings.max_restarts)
                console.print(f"shard {index}: {escape(results[index]['status'])}", highlight=False)
    except KeyboardInterrupt:
        # Each task's run stops as on Ctrl-C: it finishes its requests in flight and writes its manifest.
        console.print("[yellow]stopping: the shards finish the requests in flight[/]")
        for ref in running:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - an engine's shard may not take a cancel; it stops with the engine
                pass
        ray.wait(list(running), num_returns=len(running), timeout=30)
        for index in running.values():
            results[index] = {"status": "interrupted", "message": ""}
    finally:
        _close_engines(ray, engines, busy=list(engine_of.values()))
        if started_ray:
            ray.shutdown()
    merge_at = time.monotonic()
    merged = asyncio.run(merge_shards(run_dir, shards, checks))
    if config.teacher.logprobs is not None:
        merge_sidecars(run_dir, shards)
    merge_s = time.monotonic() - merge_at
    status = max((result["status"] for result in results.values()), key=STATUS_ORDER.index, default="complete")
    if status == "complete" and merged.failed:
        status = "complete_with_failures"
    this_run: dict[str, Any] = dict.fromkeys(SUMMED, 0)
    totals_cost = 0.0
    loops = [0.0]  # each shard's own elapsed_s: its run from its first request to its last record
    for index in range(shards):
        shard = read_manifest(shard_dir(run_dir, index)) or {}
        if index in results:
            for key in SUMMED:
                this_run[key] += (shard.get("this_run") or {}).get(key, 0)
            loops.append(float((shard.get("this_run") or {}).get("elapsed_s", 0.0)))
        totals_cost += float((shard.get("totals") or {}).get("cost_usd", 0.0))
    elapsed = time.monotonic() - started
    this_run.update(started_at=started_at, elapsed_s=round(elapsed, 3), cost_usd=round(this_run["cost_usd"], 6),
                    requests_per_s=round(this_run["requests"] / elapsed, 3))
    manifest: dict[str, Any] = {
        "status": status,
        "recipe": config.model_dump(mode="json"),
        "fingerprint": config.fingerprint(),
        "fingerprint_hash": config.fingerprint_hash(),
        "versions": package_versions(),
        "counts": {"total": total * config.samples_per_prompt, "accepted": merged.accepted,
                   "rejected": merged.rejected, "failed": merged.failed, "rejected_by": dict(merged.rejected_by)},
        "this_run": this_run,
        "totals": {"cost_usd": round(totals_cost, 6),
                   "elapsed_s": round(float(((previous or {}).get("totals") or {}).get("elapsed_s", 0.0)) + elapsed, 3)},
        "ray": {"address": settings.address, "workers": workers, "shards": shards,
                "start_s": round(ray_start_s, 3), "shards_s": round(_window(results.values()), 3),
                "longest_shard_s": max(loops),
                "merge_s": round(merge_s, 3),
                "rejected_across_shards": merged.across_shards,
                "shards_status": {str(index): result["status"] for index, result in sorted(results.items())}},
    }
    if status != "interrupted":
        try:
            manifest["stats"] = compute_stats(run_dir, manifest)
        except Exception as exc:  # noqa: BLE001 - the manifest matters more than its statistics
            manifest["stats"] = {"error": f"{type(exc).__name__}: {exc}"}
    write_manifest(run_dir, manifest)
    counters = Counters(total=total * config.samples_per_prompt, accepted=merged.accepted, rejected=merged.rejected,
                        failed=merged.failed, requests=this_run["requests"], cache_hits=this_run["cache_hits"],
                        output_tokens=this_run["output_tokens"], cost_usd=this_run["cost_usd"], started=started)
    counters.finished = time.monotonic()
    return RunResult(status, counters, _message(status, results, merged.failed))


def _check_gpus(ray: Any, workers: int, gpus: float) -> None:
    """Refuse engines the cluster cannot place: Ray would keep them (and their shards) waiting for ever."""
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if workers * gpus > have:
        raise RecipeError(
            f"ray.gpus_per_worker: {gpus:g} for {workers} worker(s) needs {workers * gpus:g} GPU(s); the Ray cluster "
            f"has {have:g}. Lower factory.ray.workers, run on a cluster with the GPUs, or (provider local) set "
            "factory.ray.gpus_per_worker: 0 to run the teacher on the CPU")


def _close_engines(ray: Any, engines: list[Any], busy: list[Any]) -> None:
    """Each idle worker's teacher closed (a vLLM engine shuts its processes down), then every actor ended. A
    busy one (a shard that did not stop when interrupted) is ended at once: its close would wait for the shard."""
    idle = [engine for engine in engines if not any(engine is other for other in busy)]
    try:
        ray.get([engine.close.remote() for engine in idle], timeout=ENGINE_CLOSE_S)
    except Exception:  # noqa: BLE001 - a dead or stuck engine is ended below all the same
        pass
    for engine in engines:
        ray.kill(engine)


def _progress(run_dir: Path, shards: int, total: int) -> str:
    """One line of the whole run's figures, from the shards' manifests (a few seconds old at most)."""
    done = requests = 0
    for index in range(shards):
        shard = read_manifest(shard_dir(run_dir, index)) or {}
        counts = shard.get("counts") or {}
        done += sum(int(counts.get(key, 0)) for key in ("accepted", "rejected", "failed"))
        requests += int((shard.get("this_run") or {}).get("requests", 0))
    return f"{done:,}/{total:,} samples written in the shards, {requests:,} requests this run"


def _window(results: Any) -> float:
    """Seconds from the first shard's start to the last one's end: the generation, without Ray's start."""
    spans = [(result["started"], result["finished"]) for result in results if "started" in result]
    return max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0


def _outcome(ray: Any, ref: Any, index: int, restarts: int) -> dict[str, Any]:
    """A finished task's result; an error it raised comes up as the error itself, naming the shard."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if isinstance(cause, ApprenticeError):
            error = ApprenticeError(f"shard {index} ({shard_dir(Path(), index)}): {cause}")
            error.exit_code = cause.exit_code
            raise error from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as exc:
        return {"status": "stopped",
                "message": f"shard {index}: its worker died {restarts + 1} time(s) ({type(exc).__name__})"}


def _message(status: str, results: dict[int, dict[str, Any]], failed: int) -> str:
    resume = "run the same command again to resume; nothing done so far is lost or paid twice"
    if status == "complete":
        return "complete"
    if status == "complete_with_failures":
        return (f"{failed} sample(s) failed after retries; their errors are in failed.jsonl. "
                "Run the same command again to retry them.")
    worst = [f"shard {index}: {result['message']}" for index, result in sorted(results.items())
             if result["status"] == status and result.get("message")]
    if not worst:
        return f"{status}: {resume}."
    return "; ".join(worst[:3]) + (f" (and {len(worst) - 3} more shards)" if len(worst) > 3 else "")

