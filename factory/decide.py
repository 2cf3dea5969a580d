"""The decision: a work item's answer through the checks, best_of, and into the run's files.

One prompt becomes work items (one request each: a request may carry several samples with `n`, or one
sample each with param_ranges or without `n`). `Decider.process` asks the teacher through the run's asker
(cache first), checks each sample in recipe order up to the first failure, and writes it as accepted or
rejected; a request that failed after retries becomes a failure record. Nothing here awaits between a
run-wide check and the write of the sample it passed, so a duplicate of a sample written just before is
always caught. Online (factory/online.py) and batch (factory/batch.py) dispatch feed it through its
public methods only.
"""
from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from apprentice.errors import FATAL_STATUS, TeacherError
from apprentice.hashing import canonical_json, stable_hash
from quality_checks import Check

from .asker import Asker, BudgetExhausted
from .limiter import LimiterClosed
from .logprobs import LogprobsWriter
from .progress import Counters
from .prompts import PromptItem
from .recipe import FactoryConfig, ranking_check
from .records import CheckResult, Failure, Sample, sample_id
from .store import ACCEPTED, FAILED, REJECTED, Store


class Stop:
    """Whether the run is stopping, and why: Ctrl-C, a fatal error, the budget. Shared by the run, the
    decider and the dispatch; stopping closes the limiters, so no new request is sent."""

    def __init__(self, close: Callable[[], None]) -> None:
        self._close = close
        self.stopping = False
        self.fatal: str | None = None
        self.budget_hit = False

    def __call__(self, *, fatal: str | None = None, budget: bool = False) -> None:
        self.fatal = self.fatal or fatal
        self.budget_hit = self.budget_hit or budget
        if not self.stopping:
            self.stopping = True
            self._close()


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


def work_items(prompt: PromptItem, config: FactoryConfig, build: Callable[[list[dict[str, str]], int], dict[str, Any]],
               supports_n: bool) -> list[WorkItem]:
    """The requests of one prompt, each with the record ids of the samples it answers. `build(messages, n)`
    is the exact body (the asker's, with the teacher's context); `supports_n`: the API can answer n at once.
    `generate --dry-run` (factory/plan.py) counts the same requests."""
    n = config.samples_per_prompt
    ranges = config.teacher.param_ranges
    if ranges is not None:
        # Each sample its own draw, hence its own request even where the API has `n`: one temperature
        # shared by n samples would tie every sample of a prompt to one setting, and quality could not be
        # told apart from the prompt. The price is the prompt's input tokens paid once per sample.
        body = build(prompt.messages, 1)
        drawn = [ranges.draw(prompt.id, i) for i in range(n)]
        slots = [([i], {**body, **values}, {**config.teacher.params, **values}) for i, values in enumerate(drawn)]
    elif supports_n:
        slots = [(list(range(n)), build(prompt.messages, n), None)]
    else:
        body = build(prompt.messages, 1)
        slots = [([i], body, None) for i in range(n)]
    items = []
    for indices, body, params in slots:
        body_json = canonical_json(body)
        request_key = stable_hash(body_json)
        ids = [sample_id(prompt.id, index, request_key) for index in indices]
        items.append(WorkItem(prompt, indices, body, body_json, ids, params=params))
    return items


class Decider:
    """Turns work items into records: asks, checks, ranks (best_of), writes."""

    def __init__(self, config: FactoryConfig, *, store: Store, asker: Asker, checks: list[Check],
                 counters: Counters, sidecar: LogprobsWriter | None, stop: Stop) -> None:
        self.config = config
        self.store = store
        self.asker = asker
        self.counters = counters
        self.sidecar = sidecar  # the logprobs sidecar writer, when the recipe asks for teacher.logprobs
        self.stop = stop
        self.rejected_by: Counter = Counter()
        self.checks = checks
        # A sample kept before a crash is in the dedup indexes already: it would match itself.
        self.rescore_checks = [check for check in checks if not check.run_wide]
        self.run_wide = [check for check in checks if check.run_wide]
        # With a check that awaits, samples are checked concurrently: the dedup checks run again before a write.
        self.recheck = any(check.awaits for check in checks)
        self.best_of = config.best_of
        self.rank_by = ranking_check(config.best_of.by, config.checks) if config.best_of is not None else None
        teacher = asker.teacher
        self.teacher_meta = {"provider": teacher.provider, "model": teacher.model, "params": config.teacher.params}

    # ---- work items ---------------------------------------------------------------------------------
    def open_items(self, prompt: PromptItem) -> list[WorkItem]:
        """The work items of one prompt that still have a sample to make (with best_of: all of a prompt
        that has one, tied to their group); what is on disk already is counted as resumed."""
        items = self._work_items(prompt)
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

    def _work_items(self, prompt: PromptItem) -> list[WorkItem]:
        return work_items(prompt, self.config, self.asker.build, self.asker.teacher.supports_n)

    def fail_item(self, item: WorkItem, error: TeacherError) -> None:
        """Every open sample slot of `item` failed with `error` (batch mode: a request no batch answered)."""
        entries = [_Entry(record_id, index) for record_id, index in zip(item.ids, item.indices)
                   if not self.store.is_done(record_id)]
        for entry in entries:
            entry.error = error
        self._report(item, entries)

    async def process(self, item: WorkItem) -> None:
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
                usage = {**response.usage(), "cost_usd": cost, "shared_by": len(item.indices)}
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
            self.stop(budget=True)
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

    def _check_sync(self, sample: Sample, checks: list[Check]) -> None:
        for check in checks:
            if not self._apply(sample, check, check(sample)):
                return

    async def _check_async(self, sample: Sample, checks: list[Check]) -> None:
        for check in checks:
            if check.awaits:
                try:
                    verdict = await check.averdict(sample)
                except TeacherError as error:  # the record says which model failed
                    raise error.prefixed(check.name) from None
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
            fatal = next((entry for entry in errors if entry.error.fatal), None)
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
        if self.sidecar is not None and entry.logprobs is not None:
            # Before the JSONL line: a record on disk always has its logprobs on disk (factory/logprobs.py).
            self.sidecar.write(sample.id, entry.logprobs)
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
        if error.fatal:
            why = f"{FATAL_STATUS[error.status]} ({error})"
            variable = self.config.teacher.api_key_env
            if error.status == 401 and variable and not os.environ.get(variable):
                # With a base_url and no key the request went out with a placeholder: say which variable is unset.
                why += f"; {variable} is not set in this process's environment"
            self.stop(fatal=why)
            return  # not recorded: the run stops, and the same command retries these
        failure = Failure(
            id=entry.record_id,
            prompt_id=prompt.id,
            sample_index=entry.index,
            prompt=prompt.messages,
            error=str(error),
            status=error.status,
            attempts=error.attempts,
            attributes=prompt.attributes,
        )
        self.store.write(FAILED, failure.to_json())
        self.counters.failed += 1


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
