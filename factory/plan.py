"""`factory generate --dry-run`: what a run would send and what it may cost; nothing is sent or written.

It checks what a run checks before its first request (the recipe, the prompts, the checks, the API keys, a
price when budget_usd is set, the settings of an existing run directory), then streams the prompts once and
builds every request body as the run would (`decide.work_items`): samples already on disk and answers already
in the run's cache are not asked again. Of the rest it counts the requests and estimates

- input tokens: with the model's own encoding where it is known (OpenAI models: o200k_base, cl100k_base),
  read from the `bpe-openai` package, which bundles both (tiktoken would fetch them from the network);
  otherwise the limiter's estimate of characters / 4, calibrated on the run's records when it has some;
- output tokens: max_tokens per sample, an upper bound, and the mean of the run's records when it has some
  (a pilot run: `--limit 20` first);

and prices them (factory/pricing.py) against budget_usd. The run directory is only read: it is not created,
nor locked (a run writing it meanwhile makes the counts a snapshot); grid and dataset prompts are written to a
temporary directory, the cache is read without a write (see _ReadOnlyCache).
"""
from __future__ import annotations

import json
import math
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.markup import escape

from apprentice.errors import ApprenticeError
from quality_checks import build_checks

from .cache import cache_key
from .decide import work_items
from .limiter import FRAMING_TOKENS, MIN_TOKENS_PER_CHAR, estimate_tokens
from .pricing import Pricer, pricer_for, usd
from .prompts import SourceEnv, check_prompts, iter_prompts
from .recipe import IN_PROCESS, FactoryConfig
from .run_report import check_compatible, describe_teacher
from .self_instruct import INSTRUCTION, check_seeds, finished_expansion, user_text
from .sources import source_name, write_prompts
from .store import ACCEPTED, CACHE, REJECTED, id_key
from .teachers import make_teacher

PILOT_RECORDS = 2000  # records read for the pilot's means; the ids of all are read
# Model name prefixes → their encoding, longest first where one prefix starts another (tiktoken's table).
ENCODINGS = (("gpt-4o", "o200k_base"), ("chatgpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"),
             ("gpt-4.5", "o200k_base"), ("gpt-5", "o200k_base"), ("o1", "o200k_base"), ("o3", "o200k_base"),
             ("o4", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-3.5", "cl100k_base"), ("gpt-35", "cl100k_base"))


@dataclass
class Pilot:
    """What the records already in the run directory say."""

    done: set[int] = field(default_factory=set)  # ids (as Store keys them) of accepted and rejected records
    records: int = 0  # read for the means
    output_tokens: float = 0.0  # per sample, summed
    input_tokens: float = 0.0  # per request, summed (each record's share)
    input_chars: float = 0.0
    requests: float = 0.0  # the requests behind input_tokens (a request of n samples counts 1/n a record)

    @property
    def mean_output(self) -> float | None:
        return self.output_tokens / self.records if self.records else None

    @property
    def tokens_per_char(self) -> float | None:
        if not (self.input_tokens and self.input_chars):
            return None
        # estimate_tokens adds each request's framing: what is learnt per character leaves it out
        return max(MIN_TOKENS_PER_CHAR, (self.input_tokens - FRAMING_TOKENS * self.requests) / self.input_chars)


@dataclass
class Plan:
    prompts: int = 0
    prompts_from: str = ""
    samples: int = 0  # prompts × samples_per_prompt
    requests: int = 0  # requests the whole run makes, from the first
    done_samples: int = 0  # on disk already
    cached: int = 0  # requests answered by the run's cache (paid before)
    to_send: int = 0
    samples_to_make: int = 0  # the samples of the requests to send
    input_tokens: int = 0  # of the requests to send
    tokens_by: str = ""
    max_output_tokens: int = 0  # of the requests to send: max_tokens each sample
    pilot: Pilot = field(default_factory=Pilot)
    pricer: Pricer | None = None
    cost_input: float = 0.0  # of the requests to send: input only
    cost_expected: float | None = None  # input + the pilot's mean output
    cost_max: float = 0.0  # input + max_tokens for every sample
    spent_before: float = 0.0
    expansion: dict[str, Any] | None = None  # self-instruct not run yet: its requests and cost, at most
    judges: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class TokenCounter:
    """Input tokens of a request: the model's encoding where it is known and bpe-openai is installed (with
    OpenAI's framing of 3 tokens a message and 3 for the answer), the characters / 4 estimate otherwise."""

    def __init__(self, provider: str, model: str, tokens_per_char: float | None) -> None:
        self.encoding = _encoding(model) if provider == "openai" else None
        self.tokens_per_char = tokens_per_char
        if self.encoding is not None:
            self.name = f"{self.encoding.name} (bpe-openai)"
        else:
            self.name = ("characters × {:.3f}, calibrated on the run's records".format(tokens_per_char)
                         if tokens_per_char else "characters / 4")

    def count(self, messages: list[dict[str, str]]) -> int:
        if self.encoding is not None:
            return sum(len(self.encoding.encode_ordinary(m["content"])) + 3 for m in messages) + 3
        chars = sum(len(m["content"]) for m in messages)
        return estimate_tokens(chars, self.tokens_per_char) if self.tokens_per_char else estimate_tokens(chars)


def _encoding(model: str) -> Any:
    name = next((encoding for prefix, encoding in ENCODINGS if model.lower().startswith(prefix)), None)
    if name is None:
        return None
    try:
        import bpe_openai  # optional (pip install 'apprentice[tokens]'): tiktoken's encodings, bundled
    except ImportError:
        return None
    return bpe_openai.get_encoding(name)


async def plan_run(config: FactoryConfig, *, limit: int | None = None, console: Any = None) -> Plan:
    """The dry run: every check a run makes before sending, then the counts and estimates. Raises the
    ApprenticeError the run would raise."""
    plan = Plan()
    run_dir = config.output_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ApprenticeError(f"factory.output_dir: {run_dir} is a file, not a directory; choose another "
                              "factory.output_dir (--set factory.output_dir=...) or move the file away")
    previous = check_compatible(run_dir, config) if run_dir.is_dir() else None
    totals = (previous or {}).get("totals", {})
    plan.spent_before = float(totals.get("cost_usd", 0.0)) + float((totals.get("judge") or {}).get("cost_usd", 0.0))
    plan.pricer, warning = pricer_for(config.teacher, config.budget_usd)
    if warning:
        plan.notes.append(warning)
    checks = build_checks(config.checks)
    for index, check in enumerate(checks):
        if check.teacher is not None:  # a judge: its key and price are checked as the run checks them
            pricer_for(check.teacher, config.budget_usd, f"factory.checks.{index}.teacher")
            await make_teacher(check.teacher).aclose()
            plan.judges.append(f"{check.name} ({check.teacher.model})")
    teacher = make_teacher(config.teacher)  # a hosted one checks its API key here; nothing is sent
    try:
        plan.pilot = read_pilot(run_dir, config)
        counter = TokenCounter(config.teacher.provider, config.teacher.model, plan.pilot.tokens_per_char)
        plan.tokens_by = counter.name
        with tempfile.TemporaryDirectory(prefix="apprentice-dry-run-") as scratch:
            prompts_path = await _prompts_file(config, Path(scratch), teacher, console)
            with _ReadOnlyCache(run_dir / CACHE) as cache:
                if prompts_path is None:
                    _estimate_self_instruct(plan, config, counter, limit, teacher.supports_n)
                else:
                    _count(plan, config, prompts_path, teacher, counter, cache, limit)
    finally:
        await teacher.aclose()
    return plan


async def _prompts_file(config: FactoryConfig, scratch: Path, teacher: Any, console: Any) -> Path | None:
    """The prompts the run would read, validated; None for a self-instruct expansion not made yet."""
    source = source_name(config.prompts)
    if source == "self_instruct":
        return finished_expansion(config.prompts.self_instruct, config.output_dir, teacher.provider, teacher.model)
    if source == "path":
        return config.prompts.path
    return await write_prompts(config.prompts, SourceEnv(scratch, console))  # grid, dataset: into the scratch dir


def _count(plan: Plan, config: FactoryConfig, prompts_path: Path, teacher: Any, counter: TokenCounter,
           cache: "_ReadOnlyCache", limit: int | None) -> None:
    count = check_prompts(prompts_path, config.prompts.system)
    plan.prompts = min(count, limit) if limit is not None else count
    plan.prompts_from = str(prompts_path)
    plan.samples = plan.prompts * config.samples_per_prompt

    def build(messages: list[dict[str, str]], n: int) -> dict[str, Any]:
        return teacher.build_request(config.teacher.with_context(messages), n)

    max_tokens = config.teacher.max_tokens
    mean = plan.pilot.mean_output
    expected = 0.0
    for number, prompt in enumerate(iter_prompts(prompts_path, config.prompts.system)):
        if limit is not None and number >= limit:
            break
        for item in work_items(prompt, config, build, teacher.supports_n):
            plan.requests += 1
            done = sum(id_key(record_id) in plan.pilot.done for record_id in item.ids)
            plan.done_samples += done
            if done == len(item.ids):
                continue
            if cache.has(cache_key(item.body_json, item.indices[0])):
                plan.cached += 1
                continue
            outputs = len(item.indices)
            tokens = counter.count(config.teacher.with_context(prompt.messages))
            plan.to_send += 1
            plan.samples_to_make += outputs
            plan.input_tokens += tokens
            plan.max_output_tokens += max_tokens * outputs
            plan.cost_input += plan.pricer.cost(tokens, 0)
            plan.cost_max += plan.pricer.cost(tokens, max_tokens * outputs)
            if mean is not None:
                expected += plan.pricer.cost(tokens, round(mean * outputs))
    plan.cost_expected = expected if mean is not None else None


def _estimate_self_instruct(plan: Plan, config: FactoryConfig, counter: TokenCounter, limit: int | None,
                            supports_n: bool) -> None:
    """Prompts the teacher has not written yet: the expansion's requests at most, and its `count` prompts
    sized like the seeds."""
    options = config.prompts.self_instruct
    assert options is not None
    check_seeds(options)
    seeds = [item.messages for item in iter_prompts(options.seeds, config.prompts.system)]
    seed_tokens = sum(counter.count(config.teacher.with_context(messages)) for messages in seeds) / len(seeds)
    shown = "\n".join(f"{i}. {user_text(messages)}" for i, messages in enumerate(seeds[:options.per_request], 1))
    ask = (options.instruction or INSTRUCTION).format(examples=shown, n=options.per_request)
    ask_tokens = counter.count([{"role": "user", "content": ask}])
    ask_out = options.max_tokens or config.teacher.max_tokens
    rounds = options.max_rounds
    plan.expansion = {"requests": rounds, "least": math.ceil(options.count / options.per_request),
                      "input_tokens": ask_tokens * rounds, "cost_max": rounds * plan.pricer.cost(ask_tokens, ask_out)}
    plan.prompts = min(options.count, limit) if limit is not None else options.count
    plan.prompts_from = f"self-instruct (not written yet: sized like the {len(seeds)} seeds)"
    plan.samples = plan.samples_to_make = plan.prompts * config.samples_per_prompt
    n = config.samples_per_prompt
    separate = config.teacher.param_ranges is not None or not supports_n
    plan.requests = plan.to_send = plan.prompts * (n if separate else 1)
    per_request = 1 if separate else n
    tokens = round(seed_tokens)
    max_tokens = config.teacher.max_tokens
    plan.input_tokens = tokens * plan.to_send
    plan.max_output_tokens = max_tokens * plan.samples
    plan.cost_input = plan.to_send * plan.pricer.cost(tokens, 0)
    plan.cost_max = plan.to_send * plan.pricer.cost(tokens, max_tokens * per_request)


def read_pilot(run_dir: Path, config: FactoryConfig) -> Pilot:
    """The ids of the records on disk (whole lines only: a torn last line is not a record), and from the
    first PILOT_RECORDS of them the mean output tokens per sample and the input tokens per character."""
    pilot = Pilot()
    context_chars = sum(len(m["content"]) for m in config.teacher.context or ())
    for name in (ACCEPTED, REJECTED):
        for record_id, line in _whole_lines(run_dir / name):
            pilot.done.add(id_key(record_id))
            if pilot.records >= PILOT_RECORDS:
                continue
            record = json.loads(line)
            usage = record.get("usage") or {}
            shared = max(1, int(usage.get("shared_by") or 1))
            pilot.records += 1
            pilot.output_tokens += usage.get("output_tokens", 0) / shared
            if usage.get("input_tokens"):
                pilot.input_tokens += usage["input_tokens"] / shared
                pilot.requests += 1 / shared
                pilot.input_chars += (sum(len(m["content"]) for m in record["prompt"]) + context_chars) / shared
    return pilot


def _whole_lines(path: Path) -> Iterator[tuple[str, str]]:
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                return  # cut by a crash: the run cuts it off too
            try:
                record_id = json.loads(line)["id"] if not line.startswith('{"id": "') else line[8:line.index('"', 8)]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            yield record_id, line


class _ReadOnlyCache:
    """The run's cache.sqlite, read only, or no cache.

    A cache closed cleanly is one file, opened `immutable` (SQLite creates no -wal or -shm beside it). One
    with a write-ahead log (a run writing it now, or killed) is opened `mode=ro`, which reads the log too and
    uses the files that are there."""

    def __init__(self, path: Path) -> None:
        self.db: sqlite3.Connection | None = None
        if path.is_file():
            logged = path.with_name(path.name + "-wal").exists()
            try:
                self.db = sqlite3.connect(f"{path.resolve().as_uri()}?{'mode=ro' if logged else 'immutable=1'}",
                                          uri=True)
                self.db.execute("SELECT 1 FROM responses LIMIT 1").fetchall()
            except sqlite3.Error:
                self.close()

    def has(self, key: str) -> bool:
        return self.db is not None and self.db.execute(
            "SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> "_ReadOnlyCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def print_plan(plan: Plan, config: FactoryConfig, console: Any) -> None:
    """The dry run's figures, a few lines."""
    teacher = config.teacher
    n = config.samples_per_prompt
    rows = [
        ("teacher", describe_teacher(teacher)),
        ("prompts", f"{plan.prompts:,} from {plan.prompts_from} → {plan.requests:,} request(s) → "
                    f"{plan.samples:,} sample(s)" + (f" ({n} per prompt)" if n > 1 else "")),
    ]
    if plan.done_samples or plan.cached:
        rows.append(("on disk", f"{plan.done_samples:,} sample(s) done, {plan.cached:,} request(s) answered by the "
                                f"cache → {plan.to_send:,} request(s) to send"))
    rows.append(("checks", " → ".join(check if isinstance(check, str) else check.check_name for check in config.checks)
                 or "none"))
    pilot = plan.pilot
    output = f"≤ {plan.max_output_tokens:,} (max_tokens {teacher.max_tokens} × {plan.samples_to_make:,} sample(s))"
    if pilot.mean_output is not None:
        output += f", ~{round(pilot.mean_output * plan.samples_to_make):,} at the mean of {pilot.records:,} record(s) " \
                  f"({pilot.mean_output:.0f} per sample)"
    rows.append(("tokens", f"in {plan.input_tokens:,} ({plan.tokens_by}) · out {output}"))
    if plan.expansion is not None:
        e = plan.expansion
        rows.append(("expand", f"self-instruct first: {e['least']:,} to {e['requests']:,} request(s), "
                               f"{e['input_tokens']:,} input tokens at most, ≤ {usd(e['cost_max'])}"))
    priced = plan.pricer is not None and plan.pricer.known
    expansion = plan.expansion["cost_max"] if plan.expansion else 0.0
    low, high = plan.cost_input, plan.cost_max + expansion
    if teacher.provider in IN_PROCESS:
        rows.append(("cost", "none: the model runs in this process"))
    elif not priced:
        rows.append(("cost", f"unknown: no price for {teacher.model!r} (set factory.teacher.price)"))
    else:
        cost = f"{usd(low)} (input only) to {usd(high)} (every answer max_tokens long)"
        if plan.cost_expected is not None:
            cost += f"; ~{usd(plan.cost_expected + expansion)} at the records' mean"
        if plan.judges:
            cost += f"; not counted: the judge's requests ({', '.join(plan.judges)})"
        rows.append(("cost", cost))
    rows.append(("budget", _budget(plan, config.budget_usd, low, high)))
    for name, text in rows:
        console.print(f"[bold]{name:<8}[/] {escape(text)}", highlight=False)
    for note in plan.notes:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)


def _budget(plan: Plan, budget: float | None, low: float, high: float) -> str:
    if budget is None:
        return "none (factory.budget_usd): nothing stops the run on cost"
    left = budget - plan.spent_before
    head = f"${budget:,.2f}, {usd(plan.spent_before)} spent before, {usd(left)} left: "
    if high <= left:
        return head + "fits even if every answer is max_tokens long"
    if low > left:
        return head + "too small even for the input: the run stops when it is reached (raise factory.budget_usd)"
    return head + "may be reached: the run then stops, resumable with a higher budget"
