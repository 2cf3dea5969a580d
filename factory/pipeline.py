"""The flow of one run: prompts → requests → cache or teacher → checks → store.

Prompts stream from disk through a bounded queue to a fixed pool of workers, so memory does not grow
with the number of prompts. A response is committed to the cache before its records are written,
and a record id is skipped when it is already on disk: a run killed at any moment and started again
finishes with no duplicate and no request paid twice.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from quality_checks import build_checks, prime

from . import __version__
from .asker import Asker, Budget, BudgetExhausted
from .cache import ResponseCache
from .limiter import Limiter, LimiterClosed
from .pricing import Pricer, lookup
from .progress import Counters, ProgressView, summary_line
from .prompts import PromptError, PromptItem, check_prompts, iter_prompts
from .recipe import IN_PROCESS, FactoryConfig, RecipeError, TeacherConfig, ranking_check
from .records import CheckResult, Failure, Sample, canonical_json, sample_id, stable_hash
from .store import ACCEPTED, CACHE, FAILED, REJECTED, Store, read_manifest, write_manifest
from .teachers import Teacher, TeacherError, make_teacher

# Errors that no retry will mend and that every later request would hit too: stop the run.
FATAL_STATUS = {401: "the API key was rejected", 403: "access denied", 404: "model or endpoint not found"}
MANIFEST_EVERY_S = 10.0


@dataclass(slots=True)
class WorkItem:
    prompt: PromptItem
    indices: list[int]  # sample slots this one request answers
    body: dict[str, Any]
    body_json: str
    ids: list[str]  # the record ids of those slots
    group: "_Group | None" = None  # with best_of: the prompt whose samples are decided together
    params: dict[str, Any] | None = None  # the recipe's params with this sample's drawn param_ranges values


@dataclass(slots=True)
class _Group:
    """The samples of one prompt under best_of. They are ranked once every one is checked, and written
    together, in one stretch without an await; memory holds only the prompts in flight."""

    prompt: PromptItem
    waiting: int  # work items not reported yet
    entries: list["_Entry"]


@dataclass(slots=True)
class _Entry:
    """One sample slot on its way to a record."""

    record_id: str
    index: int
    sample: Sample | None = None
    logprobs: Any = None
    error: TeacherError | None = None  # no answer after retries (from the teacher or a check's model)
    dropped: bool = False  # the run is stopping before it was answered: the next run makes it
    kept: bool = False  # best_of: accepted before a crash cut its prompt short; checked again for its score only


@dataclass
class RunResult:
    status: str  # complete | complete_with_failures | interrupted | budget_exhausted | stopped
    counters: Counters
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "complete"


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "apprentice": __version__}
    for name in ("openai", "anthropic", "transformers", "torch", "pydantic", "rich"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def check_compatible(run_dir: Path, config: FactoryConfig) -> dict[str, Any] | None:
    """Refuse to mix samples of a different teacher or settings into an existing run directory."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return None
    before = manifest.get("fingerprint", {})
    now = config.fingerprint()
    changed = [key for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if changed:
        diffs = "\n".join(f"  {key}: was {before.get(key)!r}, now {now.get(key)!r}" for key in changed)
        raise RecipeError(
            f"{run_dir} holds samples made with other settings; mixing them would mix incompatible samples:\n"
            f"{diffs}\nUse a new output directory (--set factory.output_dir={run_dir}-2), "
            f"or delete {run_dir} to start over."
        )
    return manifest


class Run:
    def __init__(
        self,
        config: FactoryConfig,
        *,
        limit: int | None = None,
        console: Console | None = None,
        teacher: Teacher | None = None,
    ) -> None:
        self.config = config
        self.limit = limit
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._teacher = teacher
        self.stopping = False
        self.fatal: str | None = None
        self.budget_hit = False
        self.rejected_by: Counter = Counter()
        self.logprobs = None  # the logprobs sidecar writer, when the recipe asks for teacher.logprobs
        self.limiters: list[Limiter] = []
        self.batches = None  # the BatchDriver, in teacher.mode: batch
        self.self_instruct: dict[str, Any] | None = None  # the expansion's figures, with prompts.self_instruct
        self.spent_usd = 0.0  # paid before the samples (the self-instruct expansion), for the budget

    # ---- set-up ---------------------------------------------------------------------------------
    def _pricer(self, teacher: TeacherConfig, key: str = "factory.teacher") -> Pricer:
        # The Batch APIs bill a share of the list price (half, for both providers).
        scale = teacher.batch.discount if teacher.mode == "batch" else 1.0
        if teacher.price is not None:
            return Pricer((teacher.price.input * scale, teacher.price.output * scale))
        if teacher.provider in IN_PROCESS:
            return Pricer((0.0, 0.0))
        price = lookup(teacher.model)
        if price is not None:
            price = (price[0] * scale, price[1] * scale)
        if price is None:
            if self.config.budget_usd is not None:
                raise RecipeError(
                    f"factory.budget_usd is set but no price is known for model {teacher.model!r}: "
                    f"set {key}.price: {{input: USD per 1M, output: USD per 1M}}"
                )
            if teacher.base_url is None:
                self.console.print(
                    f"[yellow]no price known for {teacher.model!r}; cost is shown as $0. "
                    f"Set {key}.price to track it.[/]"
                )
        return Pricer(price)

    def _manifest(self, status: str, counters: Counters, previous: dict[str, Any] | None) -> dict[str, Any]:
        totals = (previous or {}).get("totals", {})
        prev_cost = float(totals.get("cost_usd", 0.0))
        prev_elapsed = float(totals.get("elapsed_s", 0.0))
        limiter = self.limiter.stats
        load_s = getattr(self.asker.teacher, "load_s", None)
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
                "rejected_by": dict(self.resumed_rejected_by + self.rejected_by),
            },
            "this_run": {
                "started_at": self.started_at,
                "elapsed_s": round(counters.elapsed, 3),
                "requests": counters.requests,
                "cache_hits": counters.cache_hits,
                "resumed_records": counters.resumed,
                "repaired_bytes": self.store.repaired,
                "input_tokens": counters.input_tokens,
                "output_tokens": counters.output_tokens,
                "cost_usd": round(counters.cost_usd, 6),
                "requests_per_s": round(counters.requests / counters.elapsed, 3),
                "output_tokens_per_s": round(counters.output_tokens / counters.elapsed, 3),
                "retries": limiter.retries,
                "rate_limited": limiter.rate_limited,
                "server_errors": limiter.server_errors,
                "breaker_opened": limiter.breaker_opened,
                # An in-process teacher's model load, part of elapsed_s: generation alone took the difference.
                **({"teacher_load_s": round(load_s, 3)} if load_s is not None else {}),
            },
            **({"self_instruct": self.self_instruct} if self.self_instruct is not None else {}),
            "totals": {
                "cost_usd": round(prev_cost + self.spent_usd + counters.cost_usd, 6),
                "elapsed_s": round(prev_elapsed + counters.elapsed, 3),
            },
            **({"batches": self.batches.summary()} if self.batches is not None else {}),
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
        config = self.config
        expanding = config.prompts.self_instruct is not None  # the teacher writes the prompts first
        if not expanding:
            prompts_path = self._prompts_file()
            count = check_prompts(prompts_path, config.prompts.system)
        run_dir = config.output_dir
        previous = check_compatible(run_dir, config)
        pricer = self._pricer(config.teacher)
        checks = build_checks(config.checks)
        self.checks = [(check, hasattr(check, "averdict")) for check in checks]
        # A sample kept before a crash is in the dedup indexes already: it would match itself.
        self.rescore_checks = [(check, is_async) for check, is_async in self.checks if not hasattr(check, "remember")]
        # With a check that awaits, samples are checked concurrently: the dedup checks run again before a write.
        self.recheck = any(is_async for _, is_async in self.checks)
        self.best_of = config.best_of
        self.rank_by = ranking_check(config.best_of.by, config.checks) if config.best_of is not None else None
        self._warn_check_order(checks)
        # Checks that ask a model (judge): price and client now, so a missing key or price fails before anything is sent.
        self.check_models = []
        for index, check in enumerate(checks):
            model = getattr(check, "teacher", None)
            if isinstance(model, TeacherConfig):
                pricer_of_check = self._pricer(model, f"factory.checks.{index}.teacher")
                self.check_models.append((check, model, make_teacher(model), pricer_of_check))
        teacher = self._teacher or make_teacher(config.teacher)
        self.limiter = self._limiter(config.teacher, teacher)
        if expanding:
            try:
                prompts_path = await self._self_instruct(teacher, pricer)
                count = check_prompts(prompts_path, config.prompts.system)
            except BaseException:
                if self._teacher is None:
                    await teacher.aclose()
                raise
        if self.limit is not None:
            count = min(count, self.limit)
        self.store = Store(run_dir)
        from .logprobs import open_sidecar

        self.logprobs = await open_sidecar(run_dir, config.teacher, teacher)
        # Run-wide checks (dedup) learn the samples accepted before a crash; after Store cut any torn line.
        self.run_wide = [check for check in checks if hasattr(check, "remember")]
        primed_at = time.monotonic()
        primed = prime(checks, run_dir / ACCEPTED)
        primed_s = time.monotonic() - primed_at
        self.resumed_rejected_by = _count_rejected(run_dir / REJECTED) if self.store.resumed_rejected else Counter()
        cache = ResponseCache(run_dir / CACHE)
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
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_manifest(run_dir, self._manifest("running", counters, previous))
        if self.store.resumed_accepted or self.store.resumed_rejected or self.store.previous_failures:
            self.console.print(
                f"resuming {run_dir}: {self.store.resumed_accepted} accepted and "
                f"{self.store.resumed_rejected} rejected records kept, "
                f"{self.store.previous_failures} earlier failure(s) will be retried"
            )
        if primed:
            self.console.print(f"dedup index rebuilt from {primed} accepted samples in {primed_s:.1f} s")

        driver = None
        if config.teacher.mode == "batch":
            from .batch import BatchDriver

            driver = BatchDriver(self, prompts_path)
        view = ProgressView(counters, self.console, note=driver.note if driver else None)
        # Workers: enough to keep the teacher and every judge busy at once (each limiter bounds its own model).
        concurrency = sum(limiter.max_concurrency for limiter in self.limiters)
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * concurrency)
        self.teacher_meta = {"provider": teacher.provider, "model": teacher.model, "params": config.teacher.params}

        async def produce() -> None:
            sent = 0
            for prompt in iter_prompts(prompts_path, config.prompts.system):
                if self.stopping or (self.limit is not None and sent >= self.limit):
                    break
                sent += 1
                for item in self._open_items(teacher, prompt):
                    await queue.put(item)
            for _ in range(concurrency):
                await queue.put(None)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                await self._process(item)

        async def refresh() -> None:
            last_manifest = time.monotonic()
            while True:
                await asyncio.sleep(0.25)
                view.refresh()
                if time.monotonic() - last_manifest >= MANIFEST_EVERY_S:
                    last_manifest = time.monotonic()
                    write_manifest(run_dir, self._manifest("running", counters, previous))

        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_interrupt() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                self._stop()
                self.console.print("[yellow]stopping: finishing the requests in flight (Ctrl-C again to quit now)[/]")
            else:
                for task in tasks:
                    task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_interrupt)
            except (NotImplementedError, RuntimeError):
                pass
        view.start()
        refresher = asyncio.create_task(refresh())
        if driver is not None:
            tasks = [asyncio.create_task(driver.execute())]
        else:
            tasks = [asyncio.create_task(produce())] + [asyncio.create_task(work()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            self._stop()
        finally:
            counters.finished = time.monotonic()
            refresher.cancel()
            view.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
            # The producer can be parked on a full queue after the workers stopped.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._teacher is None:
                await teacher.aclose()
            for _, _, check_teacher, _ in self.check_models:
                await check_teacher.aclose()
            if self.logprobs is not None:
                self.logprobs.close()
            status = self._status()
            manifest = self._manifest(status, counters, previous)
            if status != "interrupted":  # Ctrl-C wants out now; `factory stats` computes them on demand
                manifest["stats"] = _run_stats(run_dir, manifest, self.console)
            write_manifest(run_dir, manifest)
            self.store.close()
            cache.close()
        return RunResult(status, counters, self._message(status, counters))

    def _prompts_file(self) -> Path:
        """The prompts file of a path, grid or dataset source (the last two written into the run directory)."""
        prompts = self.config.prompts
        if prompts.grid is not None:
            from .grid import write_grid

            try:
                return write_grid(prompts.grid, self.config.output_dir)
            except ValueError as exc:
                raise PromptError(f"factory.prompts.{exc}") from None
        if prompts.dataset is not None:
            from .prompt_dataset import write_dataset

            return write_dataset(prompts.dataset, self.config.output_dir, self.console)
        assert prompts.path is not None
        return prompts.path

    async def _self_instruct(self, teacher: Teacher, pricer: Pricer) -> Path:
        from .self_instruct import Expansion

        assert self.config.prompts.self_instruct is not None
        expansion = Expansion(
            self.config.prompts.self_instruct, self.config.output_dir, teacher=teacher,
            teacher_config=self.config.teacher, limiter=self.limiter, pricer=pricer,
            budget_usd=self.config.budget_usd, console=self.console,
        )
        path = await expansion.run()
        self.self_instruct = expansion.stats
        self.spent_usd = expansion.spent_usd
        return path

    def _status(self) -> str:
        if self.fatal:
            return "stopped"
        if self.budget_hit:
            return "budget_exhausted"
        if self.stopping:
            return "interrupted"
        if self.counters.failed:
            return "complete_with_failures"
        return "complete"

    def _message(self, status: str, counters: Counters) -> str:
        resume = "run the same command again to resume; nothing done so far is lost or paid twice"
        if status == "stopped":
            return f"stopped: {self.fatal}. Fix it, then {resume}."
        if status == "budget_exhausted":
            return (
                f"budget_usd={self.config.budget_usd} reached: no new requests were sent. "
                f"Raise factory.budget_usd (--set factory.budget_usd=...) and {resume}."
            )
        if status == "interrupted":
            running = len(self.batches.summary()["open"]) if self.batches is not None else 0
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

    def _stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            for limiter in self.limiters:
                limiter.close()

    def _limiter(self, config: TeacherConfig, teacher: Teacher) -> Limiter:
        # An in-process model is fed what it can batch (the recipe may ask for less); an API gets the recipe's cap.
        useful = teacher.max_useful_concurrency
        concurrency = min(config.max_concurrency or useful, useful) if useful else config.concurrency_cap
        # Slow start probes a server's limits; a model in this process has none, and starting it at 8 requests
        # would leave a continuously batching engine mostly idle for its first rounds.
        initial = concurrency if config.provider in IN_PROCESS else 8
        limiter = Limiter(max_concurrency=concurrency, rpm=config.rpm, tpm=config.tpm, max_retries=config.max_retries,
                          initial_concurrency=initial)
        self.limiters.append(limiter)
        return limiter

    def _warn_check_order(self, checks: list) -> None:
        """A judge before another check pays for samples that check would have dropped for (nearly) free."""
        first = next((i for i, check in enumerate(checks) if hasattr(check, "teacher")), None)
        if first is None:
            return
        later = [check.name for check in checks[first + 1:] if not hasattr(check, "teacher")]
        if later:
            self.console.print(
                f"[yellow]factory.checks: {', '.join(later)} after {checks[first].name}: every sample they "
                f"reject is judged (and paid for) first; put {checks[first].name} last unless that is meant[/]"
            )

    def _open_items(self, teacher: Teacher, prompt: PromptItem) -> list[WorkItem]:
        """The work items of one prompt that still have a sample to make (with best_of: all of a prompt
        that has one, tied to their group); what is on disk already is counted as resumed."""
        items = self._work_items(teacher, prompt)
        if self.best_of is not None:
            if all(self.store.is_done(record_id) for item in items for record_id in item.ids):
                self.counters.resumed += self.config.samples_per_prompt
                return []
            group = _Group(prompt, len(items), [])
            for item in items:
                item.group = group
            return items
        open_items = []
        for item in items:
            if all(self.store.is_done(record_id) for record_id in item.ids):
                self.counters.resumed += len(item.ids)
            else:
                open_items.append(item)
        return open_items

    def _work_items(self, teacher: Teacher, prompt: PromptItem) -> list[WorkItem]:
        n = self.config.samples_per_prompt
        ranges = self.config.teacher.param_ranges
        if ranges is not None:
            # Each sample its own draw, hence its own request even where the API has `n`: one temperature
            # shared by n samples would tie every sample of a prompt to one setting, and quality could not be
            # told apart from the prompt. The price is the prompt's input tokens paid once per sample.
            body = self.asker.build(prompt.messages, 1)
            drawn = [ranges.draw(prompt.id, i) for i in range(n)]
            slots = [([i], {**body, **values}, {**self.config.teacher.params, **values})
                     for i, values in enumerate(drawn)]
        elif teacher.supports_n:
            slots = [(list(range(n)), self.asker.build(prompt.messages, n), None)]
        else:
            body = self.asker.build(prompt.messages, 1)
            slots = [([i], body, None) for i in range(n)]
        items = []
        for indices, body, params in slots:
            body_json = canonical_json(body)
            request_key = stable_hash(body_json)
            ids = [sample_id(prompt.id, index, request_key) for index in indices]
            items.append(WorkItem(prompt, indices, body, body_json, ids, params=params))
        return items

    def _fail_item(self, item: WorkItem, error: TeacherError) -> None:
        """Every open sample slot of `item` failed with `error` (batch mode: a request no batch answered)."""
        entries = [_Entry(record_id, index) for record_id, index in zip(item.ids, item.indices)
                   if not self.store.is_done(record_id)]
        for entry in entries:
            entry.error = error
        self._report(item, entries)

    async def _process(self, item: WorkItem) -> None:
        store = self.store
        pending = [pos for pos, record_id in enumerate(item.ids) if not store.is_done(record_id)]
        self.counters.resumed += len(item.ids) - len(pending)
        if item.group is not None:  # best_of ranks the samples kept before a crash with the others
            kept = {pos for pos, record_id in enumerate(item.ids) if store.is_accepted(record_id)}
            pending = sorted(set(pending) | kept)
        else:
            kept = set()
        entries = [_Entry(item.ids[pos], item.indices[pos], kept=pos in kept) for pos in pending]
        if not entries:
            self._report(item, entries)
            return
        prompt = item.prompt
        try:
            response, cost = await self.asker.ask(
                item.body, body_json=item.body_json, index=item.indices[0], outputs=len(item.indices),
                chars=sum(len(m["content"]) for m in prompt.messages),
            )
        except TeacherError as error:
            for entry in entries:
                entry.error = error
        except (LimiterClosed, BudgetExhausted) as stop:
            self._stopped_by(stop, entries)
        else:
            if len(response.choices) < len(item.indices):
                error = TeacherError(f"teacher returned {len(response.choices)} choices, expected {len(item.indices)}",
                                     retryable=False)
                for entry in entries:
                    entry.error = error
            else:
                usage = {"input_tokens": response.input_tokens, "output_tokens": response.output_tokens,
                         "cost_usd": cost, "shared_by": len(item.indices)}
                for pos, entry in zip(pending, entries):
                    choice = response.choices[pos]
                    entry.logprobs = choice.logprobs
                    entry.sample = Sample(
                        id=entry.record_id,
                        prompt=prompt.messages,
                        completion=[{"role": "assistant", "content": choice.text}],
                        teacher=self.teacher_meta if item.params is None else {**self.teacher_meta, "params": item.params},
                        attributes=prompt.attributes,
                        usage=usage,
                        finish_reason=choice.finish_reason,
                        prompt_id=prompt.id,
                        sample_index=entry.index,
                        reference=prompt.reference,
                    )
                if self.recheck or item.group is not None:
                    await self._evaluate(entries)
                # else the checks run in _finish, each sample just before it is written and remembered
        self._report(item, entries)

    def _report(self, item: WorkItem, entries: list[_Entry]) -> None:
        group = item.group
        if group is None:
            self._finish(item.prompt, entries)
            return
        group.entries += entries
        group.waiting -= 1
        if group.waiting == 0:
            self._finish_group(group)

    def _stopped_by(self, stop: Exception, entries: list[_Entry]) -> None:
        """The run is stopping (Ctrl-C, a fatal error, the budget): these slots are left to the next run."""
        if isinstance(stop, BudgetExhausted):
            self.budget_hit = True
            self._stop()
        for entry in entries:
            entry.dropped = True

    # ---- checks -------------------------------------------------------------------------------
    async def _evaluate(self, entries: list[_Entry]) -> None:
        """Run the checks on each sample, in recipe order up to the first failure. With a check that awaits
        (judge) the samples of one request are checked concurrently; without one, nothing awaits (best_of)."""
        if not self.recheck:
            for entry in entries:
                self._check_sync(entry.sample, self.rescore_checks if entry.kept else self.checks)
            return
        outcomes = await asyncio.gather(
            *(self._check_async(e.sample, self.rescore_checks if e.kept else self.checks) for e in entries),
            return_exceptions=True,
        )
        for entry, outcome in zip(entries, outcomes):
            if isinstance(outcome, TeacherError):
                entry.error = outcome
            elif isinstance(outcome, (LimiterClosed, BudgetExhausted)):
                self._stopped_by(outcome, [entry])
            elif isinstance(outcome, BaseException):
                raise outcome

    def _check_sync(self, sample: Sample, checks: list) -> None:
        for check, _ in checks:
            if not self._apply(sample, check, check(sample)):
                return

    async def _check_async(self, sample: Sample, checks: list) -> None:
        for check, is_async in checks:
            if is_async:
                try:
                    verdict = await check.averdict(sample)
                except TeacherError as error:  # the record says which model failed
                    raise _prefixed(error, check.name) from None
            else:
                verdict = check(sample)
            if not self._apply(sample, check, verdict):
                return

    @staticmethod
    def _apply(sample: Sample, check: Any, verdict: Any) -> bool:
        sample.checks.append(CheckResult(check.name, verdict.passed, verdict.reason, verdict.score))
        if not verdict.passed:
            sample.rejected_by = check.name
        return verdict.passed

    def _recheck(self, sample: Sample) -> None:
        """The run-wide checks again, just before the sample is written. While a sample waited on a judge,
        others were accepted: a duplicate of one of them passed its dedup check before that one was
        remembered. A failure is appended after the checks that ran, with the reason naming the sample kept."""
        for check in self.run_wide:
            verdict = check(sample)
            if not verdict.passed:
                self._apply(sample, check, verdict)
                return

    # ---- records ------------------------------------------------------------------------------
    def _finish(self, prompt: PromptItem, entries: list[_Entry]) -> None:
        """Write the records of one request. Nothing here awaits, so the run-wide checks see every sample
        accepted before, and remember this one before the next sample is checked."""
        for entry in entries:
            if entry.dropped:
                continue
            if entry.error is not None:
                self._fail(prompt, entry, entry.error)
                continue
            if not self.recheck:
                # Checked here, one sample after the other, so that a duplicate of the sample written just
                # before is caught: the dedup checks remember each accepted sample as it is written.
                self._check_sync(entry.sample, self.checks)
            elif entry.sample.rejected_by is None:
                self._recheck(entry.sample)
            self._write(entry)

    def _finish_group(self, group: _Group) -> None:
        """Decide and write the samples of one prompt under best_of.

        The order of the writes makes a crash harmless: the samples checks rejected first, then the others
        from best to worst. A prompt cut short by a crash is therefore written up to some point of that
        order; the next run checks its samples again (answers and judgements from the cache), counts the
        ones already accepted as kept, and writes the rest as the first run would have.
        """
        prompt, entries = group.prompt, sorted(group.entries, key=lambda e: e.index)
        if any(entry.dropped for entry in entries):
            return  # the run is stopping: the next run decides this prompt, with every sample answered
        errors = [entry for entry in entries if entry.error is not None]
        if errors:
            # No ranking without every sample: the prompt waits for the next run, which answers the others
            # from the cache. A fatal error stops the run and writes nothing.
            fatal = next((entry for entry in errors if entry.error.status in FATAL_STATUS), None)
            if fatal is not None:
                self._fail(prompt, fatal, fatal.error)
                return
            first = errors[0].error
            for entry in entries:
                if not entry.kept:
                    self._fail(prompt, entry, entry.error or TeacherError(
                        f"best_of: another sample of this prompt got no answer, and the samples of a prompt "
                        f"are ranked together ({first})", retryable=False, status=first.status))
            return
        n = self.config.samples_per_prompt
        keep = self.best_of.keep
        for entry in entries:
            if not entry.kept and entry.sample.rejected_by is not None:
                self._write(entry)
        candidates = [entry for entry in entries if entry.kept or entry.sample.rejected_by is None]
        scores = {entry.index: _score(entry.sample, self.rank_by) for entry in candidates}
        candidates.sort(key=lambda e: (scores[e.index] is None, -(scores[e.index] or 0.0), e.index))
        best: list[float | None] = []
        for entry in candidates:
            score = scores[entry.index]
            if entry.kept:
                best.append(score)
                continue
            sample = entry.sample
            self._recheck(sample)
            if sample.rejected_by is None:
                if len(best) < keep:
                    best.append(score)
                    sample.checks.append(CheckResult("best_of", True, None, score))
                else:
                    reason = best_of_reason(score, best, keep, n, self.rank_by)
                    sample.checks.append(CheckResult("best_of", False, reason, score))
                    sample.rejected_by = "best_of"
            self._write(entry)

    def _write(self, entry: _Entry) -> None:
        sample = entry.sample
        if self.logprobs is not None and entry.logprobs is not None:
            # Before the JSONL line: a record on disk always has its logprobs on disk (factory/logprobs.py).
            self.logprobs.write(sample.id, entry.logprobs)
        if sample.rejected_by is None:
            self.store.write(ACCEPTED, sample.to_json())
            for check in self.run_wide:
                check.remember(sample)
            self.counters.accepted += 1
        else:
            self.store.write(REJECTED, sample.to_json())
            self.counters.rejected += 1
            self.rejected_by[sample.rejected_by] += 1

    def _fail(self, prompt: PromptItem, entry: _Entry, error: TeacherError) -> None:
        if error.status in FATAL_STATUS:
            self.fatal = f"{FATAL_STATUS[error.status]} ({error})"
            self._stop()
            return  # not recorded: the run stops, and the same command retries these
        failure = Failure(
            id=entry.record_id,
            prompt_id=prompt.id,
            sample_index=entry.index,
            prompt=prompt.messages,
            error=str(error),
            status=error.status,
            attempts=getattr(error, "attempts", 1),
            attributes=prompt.attributes,
        )
        self.store.write(FAILED, failure.to_json())
        self.counters.failed += 1


@dataclass(slots=True)
class _Spent:
    """Money paid before this run's samples (earlier runs, the self-instruct expansion), for the budget."""

    cost_usd: float


def _score(sample: Sample, name: str | None) -> float | None:
    for result in reversed(sample.checks):
        if result.name == name:
            return result.score
    return None


def best_of_reason(score: float | None, best: list[float | None], keep: int, n: int, by: str | None) -> str:
    """Why a sample that passed every check was not kept: "score 6 < best 9 of 4"."""
    def show(value: float | None) -> str:
        return "none" if value is None else f"{value:g}"

    bar = best[-1]  # the lowest score kept: candidates come best first
    mine = f"no {by} score" if score is None else f"score {show(score)}"
    relation = "=" if score == bar else "<"
    if keep == 1:
        text = f"{mine} {relation} best {show(bar)} of {n}"
    else:
        text = f"{mine} {relation} {show(bar)}, the lowest of the best {keep} of {n}"
    return text + (" (ties go to the first sample)" if relation == "=" else "")


def _prefixed(error: TeacherError, name: str) -> TeacherError:
    """The same error, its message starting with the check whose model failed ("judge: HTTP 500: ...")."""
    wrapped = TeacherError(f"{name}: {error}", retryable=error.retryable, status=error.status,
                           retry_after=error.retry_after, rate_limited=error.rate_limited)
    wrapped.attempts = getattr(error, "attempts", 1)  # type: ignore[attr-defined]
    return wrapped


def _same_endpoint(a: TeacherConfig, b: TeacherConfig) -> bool:
    """Two models whose requests count against the same rate limits share a limiter."""
    return (a.provider, a.base_url, a.api_key_env, a.model) == (b.provider, b.base_url, b.api_key_env, b.model) \
        and a.provider not in IN_PROCESS


def _run_stats(run_dir: Path, manifest: dict[str, Any], console: Console) -> dict[str, Any]:
    """The `stats` figures for the manifest: one streaming pass over the run files, bounded memory."""
    from rich.markup import escape

    from .stats import compute_stats

    try:
        return compute_stats(run_dir, manifest)
    except Exception as exc:  # noqa: BLE001 - the final manifest matters more than its statistics
        console.print(f"[yellow]stats not computed ({escape(f'{type(exc).__name__}: {exc}')}); "
                      "run `python -m factory stats`[/]")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _count_rejected(path: Path) -> Counter:
    import json

    counts: Counter = Counter()
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            counts[json.loads(line).get("rejected_by")] += 1
    return counts


def print_result(result: RunResult, console: Console, run_dir: Path) -> None:
    console.print(f"this run: {summary_line(result.counters)}", highlight=False)
    counts = (read_manifest(run_dir) or {}).get("counts", {})
    by = counts.get("rejected_by") or {}
    reasons = ", ".join(f"{name} {n}" for name, n in sorted(by.items(), key=lambda kv: -kv[1]))
    console.print(
        f"{run_dir}: {counts.get('accepted', 0)} accepted, {counts.get('rejected', 0)} rejected"
        + (f" ({reasons})" if reasons else "")
        + f", {counts.get('failed', 0)} failed — {ACCEPTED}, {REJECTED}, {FAILED}, manifest.json",
        highlight=False,
    )
    if not result.ok:
        console.print(f"[yellow]{result.message}[/]")
