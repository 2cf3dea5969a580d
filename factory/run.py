"""A run: set-up, the dispatch it drives, its status and its manifest.

    prompts ─▶ source (file, grid, dataset, self-instruct) ─▶ dispatch (online | batch) ─▶ decider ─▶ store

The run builds the parts (teacher, limiters, cache, store, checks, logprobs sidecar, asker, decider), picks
the dispatch (factory/online.py or factory/batch.py), shows progress, handles Ctrl-C and writes
`manifest.json` (every few seconds, and at the end). A response is committed to the cache before its
records are written, and a record id is skipped when it is already on disk: a run killed at any moment and
started again finishes with no duplicate and no request paid twice.
"""
from __future__ import annotations

import asyncio
import errno
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from apprentice.console import CommandConsole
from apprentice.errors import os_error_message
from quality_checks import Check, build_checks, prime

from .asker import Asker, Budget, limiter_for
from .batch import BatchDriver
from .cache import ResponseCache
from .decide import Decider, Stop
from .learnt_limits import LIMITS, limiter_key, read_limits, recall, snapshot, write_limits
from .limiter import Limiter
from .lock import DirectoryLock
from .logprobs import open_sidecar
from .online import OnlineDispatch
from .pricing import Pricer, pricer_for, usd
from .progress import Counters, ProgressView, Usage
from .prompts import SourceEnv, check_prompts
from .recipe import IN_PROCESS, FactoryConfig, TeacherConfig
from .run_report import (RUN_LOG, RunResult, check_compatible, count_rejected, describe_teacher, package_versions,
                         run_stats)
from .sources import ASKS_TEACHER, source_name, write_prompts
from .store import ACCEPTED, CACHE, REJECTED, Store, write_manifest
from .teachers import Teacher, make_teacher

MANIFEST_EVERY_S = 10.0


class Run:
    def __init__(
        self,
        config: FactoryConfig,
        *,
        limit: int | None = None,
        console: Console | None = None,
        teacher: Teacher | None = None,
        rate_share: float = 1.0,
        ramp_delay_s: float = 0.0,
    ) -> None:
        self.config = config
        self.rate_share = rate_share  # this process's part of the teacher's rate limits (factory/ray_runner.py)
        self.ramp_delay_s = ramp_delay_s  # how long its limiters pace before they ramp (factory/pacing.py)
        self.limit = limit
        self.console = console or CommandConsole()
        self._teacher = teacher
        self.limiters: list[Limiter] = []
        self.endpoint_limiters: dict[str, Limiter] = {}  # the limiters of APIs, by endpoint (limits.json)
        self._limits_kept: dict[str, Any] | None = None
        self.stop = Stop(self._close_limiters)
        self.self_instruct: dict[str, Any] | None = None  # the expansion's figures, with prompts.self_instruct
        self.spent_usd = 0.0  # paid before the samples (the self-instruct expansion), for the budget

    # ---- set-up ---------------------------------------------------------------------------------
    def _pricer(self, teacher: TeacherConfig, key: str = "factory.teacher") -> Pricer:
        pricer, warning = pricer_for(teacher, self.config.budget_usd, key)
        if warning:
            self.console.print(f"[yellow]{escape(warning)}[/]")
        return pricer

    def _manifest(self, status: str, counters: Counters, previous: dict[str, Any] | None) -> dict[str, Any]:
        totals = (previous or {}).get("totals", {})
        prev_cost = float(totals.get("cost_usd", 0.0))
        prev_elapsed = float(totals.get("elapsed_s", 0.0))
        limiter = self.limiter.stats
        load_s = self.asker.teacher.load_s
        manifest = {
            "status": status,
            "recipe": self.config.model_dump(mode="json"),
            "fingerprint": self.config.fingerprint(),
            "fingerprint_hash": self.config.fingerprint_hash(),
            "versions": package_versions(),
            "counts": {
                "total": counters.total,
                "accepted": self.store.resumed_accepted + counters.accepted,
                "rejected": self.store.resumed_rejected + counters.rejected,
                "failed": counters.failed,
                "rejected_by": dict(self.resumed_rejected_by + self.decider.rejected_by),
            },
            "this_run": {
                "started_at": self.started_at,
                "elapsed_s": round(counters.elapsed, 3),
                # This process's CPU since the run began (the Ray runner adds its workers' up): the client's cost.
                "cpu_s": round(time.process_time() - self.cpu_started, 3),
                "requests": counters.requests,
                "cache_hits": counters.cache_hits,
                "resumed_records": counters.resumed,
                "repaired_bytes": self.store.repaired,
                "input_tokens": counters.input_tokens,
                "output_tokens": counters.output_tokens,
                "cached_input_tokens": counters.cached_input_tokens,
                "cache_write_tokens": counters.cache_write_tokens,
                "cost_usd": round(counters.cost_usd, 6),
                "requests_per_s": round(counters.requests / counters.elapsed, 3),
                "output_tokens_per_s": round(counters.output_tokens / counters.elapsed, 3),
                "retries": limiter.retries,
                "rate_limited": limiter.rate_limited,
                "server_errors": limiter.server_errors,
                "breaker_opened": limiter.breaker_opened,
                # The share of the learnt limits the pace ended at (0.97 unless 429s with room left cut it).
                "pace_share": round(self.limiter.pace_share, 4),
                # An in-process teacher's model load, part of elapsed_s: generation alone took the difference.
                **({"teacher_load_s": round(load_s, 3)} if load_s is not None else {}),
            },
            **({"self_instruct": self.self_instruct} if self.self_instruct is not None else {}),
            "totals": {
                "cost_usd": round(prev_cost + self.spent_usd + counters.cost_usd, 6),
                "elapsed_s": round(prev_elapsed + counters.elapsed, 3),
            },
            **({"batches": batches} if (batches := self.dispatch.summary()) is not None else {}),
        }
        if self.check_models:  # the judge's requests, apart from the teacher's (the records carry the teacher's)
            judge = counters.judge.as_dict()
            manifest["this_run"]["judge"] = judge
            before = totals.get("judge") or {}
            manifest["totals"]["judge"] = {
                key: round(before.get(key, 0) + judge[key], 6) if key == "cost_usd" else before.get(key, 0) + judge[key]
                for key in ("requests", "input_tokens", "output_tokens", "cost_usd")
            }
        return manifest

    # ---- the run --------------------------------------------------------------------------------
    async def execute(self) -> RunResult:
        """The run, holding its directory's lock throughout: a second writer is refused, not interleaved."""
        with DirectoryLock(self.config.output_dir, "factory.output_dir"):
            return await self._execute()

    async def _execute(self) -> RunResult:
        self.cpu_started = time.process_time()
        config = self.config
        run_dir = config.output_dir
        source = source_name(config.prompts)
        env = SourceEnv(run_dir, self.console)
        if source not in ASKS_TEACHER:
            prompts_path = await write_prompts(config.prompts, env)
            count = check_prompts(prompts_path, config.prompts.system)
        previous = check_compatible(run_dir, config)
        pricer = self._pricer(config.teacher)
        checks = build_checks(config.checks)
        self._warn_check_order(checks)
        # Checks that ask a model (judge): price and client now, so a missing key or price fails before anything is sent.
        self.check_models = []
        for index, check in enumerate(checks):
            if check.teacher is not None:
                pricer_of_check = self._pricer(check.teacher, f"factory.checks.{index}.teacher")
                self.check_models.append((check, check.teacher, make_teacher(check.teacher, self.rate_share),
                                          pricer_of_check))
        teacher = self._teacher or make_teacher(config.teacher, self.rate_share)
        self.limiter = self._limiter(config.teacher, teacher)
        run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.console, CommandConsole):  # a command's console keeps a transcript for run.log
            self.console.open_log(run_dir / RUN_LOG, [config.teacher.api_key_env]
                                  + [teacher.api_key_env for _, teacher, _, _ in self.check_models])
        cache = ResponseCache(run_dir / CACHE)
        if source in ASKS_TEACHER:  # the teacher writes the prompts first, through an asker of its own
            usage = Usage()
            env.asker = Asker(teacher, config.teacher, self.limiter, cache, pricer, usage,
                              Budget(config.budget_usd, [usage]))
            try:
                prompts_path = await write_prompts(config.prompts, env)
                count = check_prompts(prompts_path, config.prompts.system)
            except BaseException:
                cache.close()
                if self._teacher is None:
                    await teacher.aclose()
                raise
            finally:
                self.self_instruct, self.spent_usd = env.figures, usage.cost_usd
        if self.limit is not None:
            count = min(count, self.limit)
        self.store = Store(run_dir)
        sidecar = await open_sidecar(run_dir, config.teacher, teacher)
        # Run-wide checks (dedup) learn the samples accepted before a crash; after Store cut any torn line.
        primed_at = time.monotonic()
        primed = prime(checks, run_dir / ACCEPTED)
        primed_s = time.monotonic() - primed_at
        self.resumed_rejected_by = count_rejected(run_dir / REJECTED) if self.store.resumed_rejected else Counter()
        counters = self.counters = Counters(total=count * config.samples_per_prompt)
        # budget_usd is for the whole run directory: what earlier runs of it paid (teacher and judge), and the
        # self-instruct expansion of this one, count against it.
        totals = (previous or {}).get("totals", {})
        paid_before = float(totals.get("cost_usd", 0.0)) + float((totals.get("judge") or {}).get("cost_usd", 0.0))
        spent_before = _Spent(paid_before + self.spent_usd)
        budget = Budget(config.budget_usd, [counters, counters.judge, spent_before])
        self.asker = Asker(teacher, config.teacher, self.limiter, cache, pricer, counters, budget)
        for check, check_config, check_teacher, check_pricer in self.check_models:
            limiter = self.limiter if _same_endpoint(check_config, config.teacher) else self._limiter(check_config, check_teacher)
            check.connect(Asker(check_teacher, check_config, limiter, cache, check_pricer, counters.judge, budget))
        learnt, warning = read_limits(run_dir)
        if warning:
            self.console.print(f"[yellow]{escape(warning)}[/]")
        if recall(self.endpoint_limiters, learnt):
            self.console.print("limits   paced from the first request where an earlier run found short windows "
                               f"({LIMITS})", highlight=False)
        self.decider = Decider(config, store=self.store, asker=self.asker, checks=checks, counters=counters,
                               sidecar=sidecar, stop=self.stop)
        if config.teacher.mode == "batch":
            self.dispatch: OnlineDispatch | BatchDriver = BatchDriver(
                self.decider, prompts_path, limit=self.limit, limiter=self.limiter, stop=self.stop,
                console=self.console)
        else:
            # Workers: two per slot of the teacher's and judges' limiters (an item waiting out a retry's backoff
            # holds a worker and sends nothing); one slot keeps one worker: prompts decided strictly in order.
            slots = sum(limiter.max_concurrency for limiter in self.limiters)
            self.dispatch = OnlineDispatch(
                self.decider, prompts_path, system=config.prompts.system, limit=self.limit, stop=self.stop,
                concurrency=slots if slots == 1 else 2 * slots)
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_manifest(run_dir, self._manifest("running", counters, previous))
        self._print_summary(prompts_path, count, teacher, checks, budget_before=spent_before.cost_usd)
        if primed:
            self.console.print(f"dedup index rebuilt from {primed} accepted samples in {primed_s:.1f} s")
        view = ProgressView(counters, self.console, note=self.dispatch.note)

        async def refresh() -> None:
            last_manifest = time.monotonic()
            while True:
                await asyncio.sleep(0.25)
                view.refresh()
                self._keep_limits()
                if time.monotonic() - last_manifest >= MANIFEST_EVERY_S:
                    last_manifest = time.monotonic()
                    write_manifest(run_dir, self._manifest("running", counters, previous))

        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_interrupt() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                self.stop()
                self.console.print("[yellow]stopping: finishing the requests in flight (Ctrl-C again to quit now)[/]")
            else:
                dispatching.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_interrupt)
            except (NotImplementedError, RuntimeError):
                pass
        view.start()
        refresher = asyncio.create_task(refresh())
        dispatching = asyncio.create_task(self.dispatch.execute())
        try:
            await dispatching
        except asyncio.CancelledError:
            self.stop()
        except OSError as exc:  # a full disk under the records, the cache or the sidecar: stop, lose nothing
            if exc.errno != errno.ENOSPC:
                raise
            self.stop(fatal=os_error_message(exc))
        finally:
            counters.finished = time.monotonic()
            refresher.cancel()
            view.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
            if not dispatching.done():
                dispatching.cancel()
            await asyncio.gather(dispatching, return_exceptions=True)
            if self._teacher is None:
                await teacher.aclose()
            for _, _, check_teacher, _ in self.check_models:
                await check_teacher.aclose()
            if sidecar is not None:
                sidecar.close()
            self._keep_limits()
            status = self._status()
            manifest = self._manifest(status, counters, previous)
            if status != "interrupted":  # Ctrl-C wants out now; `factory stats` computes them on demand
                manifest["stats"] = run_stats(run_dir, manifest, self.console)
            try:
                write_manifest(run_dir, manifest)
            except OSError as exc:  # the last manifest is a summary; the records and the cache are the truth
                self.console.print(f"[yellow]manifest.json not updated: {escape(os_error_message(exc))}[/]")
            self.store.close()
            cache.close()
        return RunResult(status, counters, self._message(status, counters))

    def _print_summary(self, prompts_path: Path, count: int, teacher: Teacher, checks: list[Check],
                       budget_before: float) -> None:
        """What the run is about to do, in a few lines (the resolved recipe is in manifest.json, and on the
        terminal with -v)."""
        config, store = self.config, self.store
        n = config.samples_per_prompt
        separate = config.teacher.param_ranges is not None or not teacher.supports_n
        requests = count * (n if separate else 1)
        how = "" if n == 1 else (f" ({n} per prompt, one request each)" if separate else f" ({n} per prompt, n={n} in one request)")
        rows = [
            ("teacher", describe_teacher(config.teacher)),
            ("prompts", f"{count:,} from {prompts_path} → {requests:,} request(s) → {count * n:,} sample(s){how}"),
            ("checks", " → ".join(check.name + (f" ({check.teacher.model})" if check.teacher is not None else "")
                                  for check in checks) or "none"),
        ]
        output = str(config.output_dir)
        if store.resumed_accepted or store.resumed_rejected or store.previous_failures:
            output += (f" (resuming: {store.resumed_accepted} accepted and {store.resumed_rejected} rejected records "
                       f"kept, {store.previous_failures} earlier failure(s) will be retried)")
        rows.append(("output", output))
        if config.budget_usd is None:
            rows.append(("budget", "none (factory.budget_usd)"))
        else:
            rows.append(("budget", f"${config.budget_usd:,.2f} for the run directory, {usd(budget_before)} spent before"))
        for name, text in rows:
            self.console.print(f"[bold]{name:<8}[/] {escape(text)}", highlight=False)

    def _status(self) -> str:
        if self.stop.fatal:
            return "stopped"
        if self.stop.budget_hit:
            return "budget_exhausted"
        if self.stop.stopping:
            return "interrupted"
        if self.counters.failed:
            return "complete_with_failures"
        return "complete"

    def _message(self, status: str, counters: Counters) -> str:
        resume = "run the same command again to resume; nothing done so far is lost or paid twice"
        if status == "stopped":
            return f"stopped: {self.stop.fatal}. Fix it, then {resume}."
        if status == "budget_exhausted":
            return (
                f"budget_usd={self.config.budget_usd} reached: no new requests were sent. "
                f"Raise factory.budget_usd (--set factory.budget_usd=...) and {resume}."
            )
        if status == "interrupted":
            batches = self.dispatch.summary()
            running = len(batches["open"]) if batches is not None else 0
            if running:
                return (f"interrupted: {running} batch(es) keep running at the provider; {resume} "
                        "(the same command collects them, nothing is submitted twice).")
            return f"interrupted: {resume}."
        if status == "complete_with_failures":
            return (
                f"{counters.failed} sample(s) failed after retries; their errors are in failed.jsonl. "
                "Run the same command again to retry them."
            )
        return "complete"

    def _close_limiters(self) -> None:
        for limiter in self.limiters:
            limiter.close()

    def _limiter(self, config: TeacherConfig, teacher: Teacher) -> Limiter:
        limiter = limiter_for(config, teacher, self.rate_share)
        limiter.pacer.ramp_delay_s = self.ramp_delay_s
        self.limiters.append(limiter)
        if config.provider not in IN_PROCESS:
            self.endpoint_limiters[limiter_key(config)] = limiter
        return limiter

    def _keep_limits(self) -> None:
        """limits.json, when a limiter learnt something since it was last written (a resumed run starts from it)."""
        learnt = snapshot(self.endpoint_limiters)
        if learnt["limiters"] and learnt != self._limits_kept:
            try:
                write_limits(self.config.output_dir, learnt)
            except OSError as exc:  # a hint for the next run: not worth stopping this one
                self.console.print(f"[yellow]{LIMITS} not written: {escape(os_error_message(exc))}[/]")
            self._limits_kept = learnt

    def _warn_check_order(self, checks: list[Check]) -> None:
        """A judge before another check pays for samples that check would have dropped for (nearly) free."""
        first = next((i for i, check in enumerate(checks) if check.teacher is not None), None)
        if first is None:
            return
        later = [check.name for check in checks[first + 1:] if check.teacher is None]
        if later:
            self.console.print(
                f"[yellow]factory.checks: {', '.join(later)} after {checks[first].name}: every sample they "
                f"reject is judged (and paid for) first; put {checks[first].name} last unless that is meant[/]"
            )


@dataclass(slots=True)
class _Spent:
    """Money paid before this run's samples (earlier runs, the self-instruct expansion), for the budget."""

    cost_usd: float


def _same_endpoint(a: TeacherConfig, b: TeacherConfig) -> bool:
    """Two models whose requests count against the same rate limits share a limiter."""
    return (a.provider, a.base_url, a.api_key_env, a.model) == (b.provider, b.base_url, b.api_key_env, b.model) \
        and a.provider not in IN_PROCESS
