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
from .cache import ResponseCache, cache_key
from .limiter import Limiter, LimiterClosed
from .pricing import Pricer, lookup
from .progress import Counters, ProgressView, summary_line
from .prompts import PromptError, PromptItem, check_prompts, iter_prompts
from .recipe import FactoryConfig, RecipeError
from .records import CheckResult, Failure, Sample, canonical_json, sample_id, stable_hash
from .store import ACCEPTED, CACHE, FAILED, REJECTED, Store, read_manifest, write_manifest
from .teachers import Teacher, TeacherError, TeacherResponse, make_teacher

# Errors that no retry will mend and that every later request would hit too: stop the run.
FATAL_STATUS = {401: "the API key was rejected", 403: "access denied", 404: "model or endpoint not found"}
MANIFEST_EVERY_S = 10.0


@dataclass(slots=True)
class WorkItem:
    prompt: PromptItem
    indices: list[int]  # sample slots this one request answers
    body: dict[str, Any]
    params: dict[str, Any] | None = None  # the recipe's params with this sample's drawn param_ranges values


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
        self.reserved_usd = 0.0
        self.logprobs = None  # the logprobs sidecar writer, when the recipe asks for teacher.logprobs
        self.batches = None  # the BatchDriver, in teacher.mode: batch
        self.self_instruct: dict[str, Any] | None = None  # the expansion's figures, with prompts.self_instruct
        self.spent_usd = 0.0  # paid before the samples (the self-instruct expansion), for the budget

    # ---- set-up ---------------------------------------------------------------------------------
    def _pricer(self) -> Pricer:
        teacher = self.config.teacher
        # The Batch APIs bill a share of the list price (half, for both providers).
        scale = teacher.batch.discount if teacher.mode == "batch" else 1.0
        if teacher.price is not None:
            return Pricer((teacher.price.input * scale, teacher.price.output * scale))
        if teacher.provider == "local":
            return Pricer((0.0, 0.0))
        price = lookup(teacher.model)
        if price is not None:
            price = (price[0] * scale, price[1] * scale)
        if price is None:
            if self.config.budget_usd is not None:
                raise RecipeError(
                    f"factory.budget_usd is set but no price is known for model {teacher.model!r}: "
                    "set factory.teacher.price: {input: USD per 1M, output: USD per 1M}"
                )
            if teacher.base_url is None:
                self.console.print(
                    f"[yellow]no price known for {teacher.model!r}; cost is shown as $0. "
                    "Set factory.teacher.price to track it.[/]"
                )
        return Pricer(price)

    def _manifest(self, status: str, counters: Counters, previous: dict[str, Any] | None) -> dict[str, Any]:
        totals = (previous or {}).get("totals", {})
        prev_cost = float(totals.get("cost_usd", 0.0))
        prev_elapsed = float(totals.get("elapsed_s", 0.0))
        limiter = self.limiter.stats
        return {
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
            },
            **({"self_instruct": self.self_instruct} if self.self_instruct is not None else {}),
            "totals": {
                "cost_usd": round(prev_cost + self.spent_usd + counters.cost_usd, 6),
                "elapsed_s": round(prev_elapsed + counters.elapsed, 3),
            },
            **({"batches": self.batches.summary()} if self.batches is not None else {}),
        }

    # ---- the run --------------------------------------------------------------------------------
    async def execute(self) -> RunResult:
        config = self.config
        expanding = config.prompts.self_instruct is not None  # the teacher writes the prompts first
        if not expanding:
            prompts_path = self._prompts_file()
            count = check_prompts(prompts_path, config.prompts.system)
        run_dir = config.output_dir
        previous = check_compatible(run_dir, config)
        pricer = self._pricer()
        checks = build_checks(config.checks)
        teacher = self._teacher or make_teacher(config.teacher)
        concurrency = config.teacher.max_concurrency
        if teacher.max_useful_concurrency:
            concurrency = min(concurrency, teacher.max_useful_concurrency)
        self.limiter = Limiter(
            max_concurrency=concurrency,
            rpm=config.teacher.rpm,
            tpm=config.teacher.tpm,
            max_retries=config.teacher.max_retries,
        )
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

        context = _Context(teacher, cache, pricer, checks, counters)
        driver = None
        if config.teacher.mode == "batch":
            from .batch import BatchDriver

            driver = BatchDriver(self, context, prompts_path)
        view = ProgressView(counters, self.console, note=driver.note if driver else None)
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * concurrency)

        async def produce() -> None:
            sent = 0
            for prompt in iter_prompts(prompts_path, config.prompts.system):
                if self.stopping or (self.limit is not None and sent >= self.limit):
                    break
                sent += 1
                for item in self._work_items(teacher, prompt):
                    await queue.put(item)
            for _ in range(concurrency):
                await queue.put(None)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                await self._process(item, context)

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
            self.limiter.close()

    def _work_items(self, teacher: Teacher, prompt: PromptItem) -> list[WorkItem]:
        n = self.config.samples_per_prompt
        messages = self.config.teacher.with_context(prompt.messages)
        ranges = self.config.teacher.param_ranges
        if ranges is not None:
            # Each sample its own draw, hence its own request even where the API has `n`: one temperature
            # shared by n samples would tie every sample of a prompt to one setting, and quality could not be
            # told apart from the prompt. The price is the prompt's input tokens paid once per sample.
            body = teacher.build_request(messages, 1)
            items = []
            for i in range(n):
                drawn = ranges.draw(prompt.id, i)
                items.append(WorkItem(prompt, [i], {**body, **drawn}, {**self.config.teacher.params, **drawn}))
            return items
        if teacher.supports_n:
            return [WorkItem(prompt, list(range(n)), teacher.build_request(messages, n))]
        body = teacher.build_request(messages, 1)
        return [WorkItem(prompt, [i], body) for i in range(n)]

    async def _process(self, item: WorkItem, ctx: "_Context") -> None:
        store = self.store
        counters = ctx.counters
        body_json = canonical_json(item.body)
        request_key = stable_hash(body_json)
        prompt = item.prompt
        ids = [sample_id(prompt.id, index, request_key) for index in item.indices]
        pending = [(pos, record_id) for pos, record_id in enumerate(ids) if not store.is_done(record_id)]
        counters.resumed += len(ids) - len(pending)
        if not pending:
            return
        key = cache_key(body_json, item.indices[0])
        cached = ctx.cache.get(key)
        if cached is not None:
            response = TeacherResponse.from_cache(cached[0])
            cost = cached[1]
            counters.cache_hits += 1
        else:
            if self.stopping:
                return
            chars = sum(len(m["content"]) for m in prompt.messages)
            chars += sum(len(m["content"]) for m in self.config.teacher.context or ())
            est_in = self.limiter.estimate_tokens(chars)
            max_out = self.config.teacher.max_tokens * len(item.indices)
            worst = ctx.pricer.cost(est_in, max_out)
            budget = self.config.budget_usd
            if budget is not None and self.spent_usd + counters.cost_usd + self.reserved_usd + worst > budget:
                self.budget_hit = True
                self._stop()
                return
            self.reserved_usd += worst
            try:
                response, _ = await self.limiter.run(
                    lambda: ctx.teacher.complete(item.body), input_tokens=est_in, output_tokens=max_out
                )
            except TeacherError as error:
                self._fail(item, pending, ids, error, getattr(error, "attempts", 1))
                return
            except LimiterClosed:
                return  # the run is stopping; the same command sends it later
            finally:
                self.reserved_usd -= worst
            cost = ctx.pricer.cost(response.input_tokens, response.output_tokens)
            ctx.cache.put(key, response.to_cache(), cost)
            self.limiter.calibrate(chars, response.input_tokens)
            counters.requests += 1
            counters.input_tokens += response.input_tokens
            counters.output_tokens += response.output_tokens
            counters.cost_usd += cost

        shared_by = len(item.indices)
        if len(response.choices) < shared_by:
            error = TeacherError(
                f"teacher returned {len(response.choices)} choices, expected {shared_by}", retryable=False
            )
            self._fail(item, pending, ids, error, 1)
            return
        usage = {
            "input_tokens": response.input_tokens,
            "output_tokens": response.output_tokens,
            "cost_usd": cost,
            "shared_by": shared_by,
        }
        teacher_meta = {"provider": ctx.teacher.provider, "model": ctx.teacher.model,
                        "params": item.params if item.params is not None else self.config.teacher.params}
        for pos, record_id in pending:
            choice = response.choices[pos]
            sample = Sample(
                id=record_id,
                prompt=prompt.messages,
                completion=[{"role": "assistant", "content": choice.text}],
                teacher=teacher_meta,
                attributes=prompt.attributes,
                usage=usage,
                finish_reason=choice.finish_reason,
                prompt_id=prompt.id,
                sample_index=item.indices[pos],
                reference=prompt.reference,
            )
            for check in ctx.checks:
                verdict = check(sample)
                sample.checks.append(CheckResult(check.name, verdict.passed, verdict.reason, verdict.score))
                if not verdict.passed:
                    sample.rejected_by = check.name
                    break
            if self.logprobs is not None and choice.logprobs is not None:
                # Before the JSONL line: a record on disk always has its logprobs on disk (factory/logprobs.py).
                self.logprobs.write(record_id, choice.logprobs)
            if sample.rejected_by is None:
                store.write(ACCEPTED, sample.to_json())
                for check in self.run_wide:
                    check.remember(sample)
                counters.accepted += 1
            else:
                store.write(REJECTED, sample.to_json())
                counters.rejected += 1
                self.rejected_by[sample.rejected_by] += 1

    def _fail(self, item: WorkItem, pending: list[tuple[int, str]], ids: list[str], error: TeacherError, attempts: int) -> None:
        if error.status in FATAL_STATUS:
            self.fatal = f"{FATAL_STATUS[error.status]} ({error})"
            self._stop()
            return  # not recorded: the run stops, and the same command retries these
        for pos, record_id in pending:
            failure = Failure(
                id=record_id,
                prompt_id=item.prompt.id,
                sample_index=item.indices[pos],
                prompt=item.prompt.messages,
                error=str(error),
                status=error.status,
                attempts=attempts,
                attributes=item.prompt.attributes,
            )
            self.store.write(FAILED, failure.to_json())
            self.counters.failed += 1


@dataclass(slots=True)
class _Context:
    teacher: Teacher
    cache: ResponseCache
    pricer: Pricer
    checks: list
    counters: Counters


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
