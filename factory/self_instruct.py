"""Self-instruct: the teacher writes new prompts from a few seed prompts; near-duplicates are dropped.

    prompts:
      self_instruct:
        seeds: data/seeds/demo.jsonl     # prompt lines, like prompts.path
        count: 500                       # new prompts wanted (the seeds are not among them)
        per_request: 8                   # seed examples shown per request; as many new prompts are asked for
        rounds: null                     # at most this many requests (default: 5 × count / per_request, ≥ 10)
        similarity: {method: rouge_l, max: 0.7}   # or minhash (estimated Jaccard of word pairs: faster)
        instruction: null                # your own request text, with {examples} and optionally {n}
        max_tokens: null                 # for each answer (default: the teacher's params.max_tokens)
        seed: 0

Round r shows `per_request` seeds drawn by a RNG seeded with (seed, r) and asks for as many new prompts.
The answer is cut into prompts (a numbered or bulleted list, or one prompt a line), and each is compared
with every seed and every prompt accepted so far: one more similar than `similarity.max` is dropped into
`prompts.self_instruct.rejected.jsonl` with the reason and the prompt it resembles; the others go to
`prompts.self_instruct.jsonl` (ids si-000001…, attribute source: self_instruct) until `count` are there.
The run then generates answers for them like for any prompts file.

Requests go through the run's teacher, limiter and response cache, and rounds are judged in order: a run
stopped half-way rebuilds the same prompts from the cache (paying nothing again) and continues, and a
finished expansion (`prompts.self_instruct.state.json` says so for these settings) is reused as it is.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from apprentice.errors import FATAL_STATUS, TeacherError
from apprentice.responses import TeacherResponse
from apprentice.text import answer_words, rouge_l_words
from quality_checks.minhash import MinHasher, text_shingles

from .asker import Asker, BudgetExhausted
from .prompt_config import SelfInstructConfig, Similarity
from .prompts import PromptError, SourceEnv, check_prompts, iter_prompts

KEY = "factory.prompts.self_instruct"
PROMPTS_FILE = "prompts.self_instruct.jsonl"
REJECTED_FILE = "prompts.self_instruct.rejected.jsonl"
STATE_FILE = "prompts.self_instruct.state.json"
MINHASH_SHINGLE = 2  # prompts are short: word pairs

INSTRUCTION = """You are helping to build a varied set of prompts: requests or questions that users send to an \
AI assistant. Here are some examples:

{examples}

Write {n} new prompts. Make each one different from the examples and from the others: vary the topic, the \
kind of task, the length and the difficulty. Each prompt must stand on its own. Answer with a numbered list, \
one prompt per item, and nothing else."""


# ---- the answer as prompts ---------------------------------------------------------------------------------
# "1. ", "2) ", "(3) ", "- ", "* ", "• ", "**4.** ", "Prompt 5: ", "### 6." and the like, at the start of a line.
_ITEM = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:\*\*|__)?\s*(?:\(?\d{1,4}[.):\]]|[-*•]\s|(?:prompt|task|question|instruction)\s*#?\d+\s*[:.)-])"
    r"\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^(?:\*\*|__)?(?:prompt|task|question|instruction)(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*", re.IGNORECASE)


def _clean(text: str) -> str:
    text = _LABEL.sub("", text.strip()).strip()
    if text.count("**") % 2:  # "**3.** Third" lost its first pair to the item marker
        text = text.strip("*").strip()
    for left, right in (('"', '"'), ("“", "”"), ("'", "'"), ("**", "**")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
    return text


def parse_prompts(answer: str) -> list[str]:
    """The prompts in a teacher's answer.

    A numbered or bulleted list gives one prompt per item (lines that follow an item without a blank line
    belong to it; text before the first item and after a blank line is chatter and dropped). An answer with
    no list gives one prompt per line, less a first line that ends with a colon ("Here are 8 prompts:").
    """
    lines = answer.replace("\r\n", "\n").split("\n")
    items: list[str] = []
    if any(_ITEM.match(line) for line in lines):
        current: list[str] | None = None
        for line in lines:
            match = _ITEM.match(line)
            if match:
                if current is not None:
                    items.append("\n".join(current))
                current = [line[match.end():].strip()]
            elif not line.strip():
                if current is not None:
                    items.append("\n".join(current))
                current = None
            elif current is not None:
                current.append(line.strip())
        if current is not None:
            items.append("\n".join(current))
    else:
        items = [line.strip() for line in lines if line.strip()]
        if len(items) > 1 and items[0].endswith(":"):
            items = items[1:]
    return [text for text in (_clean(item) for item in items) if text]


# ---- similarity ----------------------------------------------------------------------------------------------
class _Index:
    """Every prompt so far (seeds and accepted), to find the most similar one to a candidate."""

    def __init__(self, similarity: Similarity) -> None:
        self.method = similarity.method
        self.labels: list[tuple[str, str]] = []  # (id, prompt)
        if self.method == "rouge_l":
            self.words: list[list[str]] = []
        else:
            self.hasher = MinHasher(num_perm=128, shingle=MINHASH_SHINGLE)
            self.signatures = np.empty((64, 128), dtype=np.uint32)

    def prepare(self, text: str) -> Any:
        """The candidate's comparable form, or None when it has no words."""
        if self.method == "rouge_l":
            words = answer_words(text)
            return words or None
        shingles = text_shingles(text, MINHASH_SHINGLE)
        return self.hasher.signature_of_hashes(shingles) if shingles.size else None

    def closest(self, prepared: Any) -> tuple[float, int]:
        """(similarity, row) of the most similar prompt so far; (0, -1) when there is none."""
        n = len(self.labels)
        if n == 0:
            return 0.0, -1
        if self.method == "rouge_l":
            scores = [rouge_l_words(prepared, words) for words in self.words]
            row = max(range(n), key=scores.__getitem__)
            return scores[row], row
        scores = np.count_nonzero(self.signatures[:n] == prepared, axis=1)
        row = int(np.argmax(scores))
        return float(scores[row]) / self.signatures.shape[1], row

    def add(self, prompt_id: str, text: str, prepared: Any) -> None:
        if self.method == "rouge_l":
            self.words.append(prepared if prepared is not None else [])
        else:
            if len(self.labels) == len(self.signatures):
                self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
            self.signatures[len(self.labels)] = prepared if prepared is not None else self.hasher.signature("")
        self.labels.append((prompt_id, text))


def check_seeds(config: SelfInstructConfig) -> None:
    """The seeds file exists and every line is a prompt; each problem named under the recipe key."""
    if not config.seeds.is_file():
        raise PromptError(f"{KEY}.seeds: {config.seeds} not found; give a JSONL file of prompt lines")
    try:
        check_prompts(config.seeds)
    except PromptError as exc:
        raise PromptError(f"{KEY}.seeds: {exc}") from None


def user_text(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] == "user")


# ---- the expansion ---------------------------------------------------------------------------------------------
def expansion_settings(config: SelfInstructConfig, provider: str, model: str) -> dict[str, Any]:
    """What decides the prompts: the settings, the seeds' content and the teacher."""
    seeds = config.seeds
    digest = hashlib.sha256(seeds.read_bytes()).hexdigest() if seeds.is_file() else None
    return {"self_instruct": config.model_dump(mode="json"), "seeds_sha256": digest,
            "teacher": {"provider": provider, "model": model}}


def finished_expansion(config: SelfInstructConfig, run_dir: Path, provider: str, model: str) -> Path | None:
    """The prompts file of an expansion finished in `run_dir` with these settings (reused as it is), or None."""
    path, state_path = run_dir / PROMPTS_FILE, run_dir / STATE_FILE
    if not (state_path.is_file() and path.is_file()):
        return None
    state = json.loads(state_path.read_text(encoding="utf-8"))
    return path if state.get("settings") == expansion_settings(config, provider, model) else None


class Expansion:
    """One self-instruct expansion in a run directory; `await run()` returns the prompts file.

    Its requests go through the run's asker, like the teacher's and the judge's: the run's limiter, its
    cache (a round answered once is never paid again) and budget_usd."""

    def __init__(self, config: SelfInstructConfig, run_dir: Path, *, asker: Asker, console: Any) -> None:
        self.config = config
        self.run_dir = run_dir
        self.asker = asker
        self.console = console
        self.stats: dict[str, Any] = {}

    @property
    def spent_usd(self) -> float:
        """Paid in this run (answers from the cache cost nothing now), for the budget."""
        return self.asker.usage.cost_usd

    def _recorded(self) -> dict[str, Any]:
        return expansion_settings(self.config, self.asker.teacher.provider, self.asker.teacher.model)

    async def run(self) -> Path:
        config = self.config
        path, rejected_path, state_path = (self.run_dir / name for name in (PROMPTS_FILE, REJECTED_FILE, STATE_FILE))
        if finished_expansion(config, self.run_dir, self.asker.teacher.provider, self.asker.teacher.model):
            self.stats = json.loads(state_path.read_text(encoding="utf-8"))["stats"]
            self._report(path, reused=True)
            return path
        check_seeds(config)
        seeds = [(item.id, user_text(item.messages)) for item in iter_prompts(config.seeds)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state_path.unlink(missing_ok=True)
        # Rebuilt from round 0: rounds answered before come from the cache, judged in the same order, so a
        # stopped expansion writes the same prompts again (and nothing is paid twice) before it continues.
        with path.open("w", encoding="utf-8") as accepted_file, rejected_path.open("w", encoding="utf-8") as rejected_file:
            stats = await self._expand(seeds, accepted_file, rejected_file)
        self.stats = stats
        state = {"settings": self._recorded(), "stats": stats}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(state_path)
        self._report(path, reused=False)
        return path

    def _report(self, path: Path, reused: bool) -> None:
        stats = self.stats
        how = "reused" if reused else (f"{stats['requests']} request(s) sent, {stats['cache_hits']} from the cache, "
                                       f"${stats['cost_usd']:.4f}")
        self.console.print(
            f"self-instruct: {stats['prompts']} new prompts in {stats['rounds']} round(s), {stats['rejected']} "
            f"dropped ({REJECTED_FILE}) → {escape(str(path))} ({how})", highlight=False,
        )
        if stats["prompts"] < self.config.count:
            self.console.print(
                f"[yellow]self-instruct: only {stats['prompts']} of {self.config.count} prompts after "
                f"{stats['rounds']} rounds (the rest were too similar): raise {KEY}.rounds or "
                f"{KEY}.similarity.max, or give more varied seeds[/]"
            )

    def _body(self, seeds: list[tuple[str, str]], round_index: int) -> dict[str, Any]:
        config = self.config
        rng = random.Random(f"self_instruct:{config.seed}:{round_index}")
        shown = rng.sample(seeds, min(config.per_request, len(seeds)))
        examples = "\n".join(f"{i}. {text}" for i, (_, text) in enumerate(shown, start=1))
        text = (config.instruction or INSTRUCTION).format(examples=examples, n=config.per_request)
        body = self.asker.teacher.build_request([{"role": "user", "content": text}], 1)
        if config.max_tokens is not None:
            body["max_tokens"] = config.max_tokens
        return body

    async def _answer(self, body: dict[str, Any], round_index: int, stats: dict[str, Any]) -> TeacherResponse:
        """The teacher's answer to one round: from the cache, or paid for and cached."""
        max_tokens = int(body.get("max_tokens") or self.asker.config.max_tokens)
        try:
            response, cost = await self.asker.ask(body, chars=len(body["messages"][-1]["content"]), index=round_index,
                                                  max_tokens=max_tokens, with_context=False)
        except BudgetExhausted:
            raise PromptError(f"self-instruct stopped: budget_usd={self.asker.budget.limit} reached. Raise "
                              "factory.budget_usd and run the same command again; nothing paid for is lost") from None
        except TeacherError as error:
            why = FATAL_STATUS.get(error.status or 0, "the request failed after retries")
            raise PromptError(f"self-instruct round {round_index}: {why} ({error}). Fix it and run the same "
                              "command again; the rounds answered so far come from the cache") from None
        stats["cost_usd"] += cost
        return response

    async def _expand(self, seeds: list[tuple[str, str]], accepted_file: Any, rejected_file: Any) -> dict[str, Any]:
        config = self.config
        index = _Index(config.similarity)
        for seed_id, text in seeds:
            index.add(seed_id, text, index.prepare(text))
        stats = {"prompts": 0, "rejected": 0, "rounds": 0, "requests": 0, "cache_hits": 0, "cost_usd": 0.0,
                 "rejected_by": {}}
        usage = self.asker.usage
        requests_before, hits_before = usage.requests, usage.cache_hits
        tasks: dict[int, asyncio.Task] = {}
        progress = Progress(TextColumn("self-instruct"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("prompts · {task.fields[dropped]} dropped · round {task.fields[round]}"),
                            console=self.console, transient=True)
        bar = progress.add_task("", total=config.count, dropped=0, round=0)
        next_round = 0
        try:
            with progress:
                while stats["prompts"] < config.count and next_round < config.max_rounds:
                    # A few rounds in flight, judged strictly in order: the outcome never depends on timing.
                    wanted = math.ceil((config.count - stats["prompts"]) / config.per_request)
                    window = max(1, min(wanted, self.asker.config.concurrency_cap))
                    for r in range(next_round, min(next_round + window, config.max_rounds)):
                        if r not in tasks:
                            tasks[r] = asyncio.create_task(self._answer(self._body(seeds, r), r, stats))
                    response = await tasks.pop(next_round)
                    self._judge(response, next_round, index, stats, accepted_file, rejected_file)
                    next_round += 1
                    stats["rounds"] = next_round
                    progress.update(bar, completed=stats["prompts"], dropped=stats["rejected"], round=next_round)
        finally:
            if tasks:  # answers on their way are paid for: let them reach the cache (for a resume or a larger count)
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            stats["requests"] = usage.requests - requests_before
            stats["cache_hits"] = usage.cache_hits - hits_before
        stats["cost_usd"] = round(stats["cost_usd"], 6)
        return stats

    def _judge(self, response: Any, round_index: int, index: _Index, stats: dict[str, Any],
               accepted_file: Any, rejected_file: Any) -> None:
        choice = response.choices[0]
        candidates = parse_prompts(choice.text)
        for position, text in enumerate(candidates):
            if stats["prompts"] >= self.config.count:
                break
            prepared = index.prepare(text)
            kind, reason, score, similar = None, "", None, None
            if position == len(candidates) - 1 and choice.finish_reason == "length":
                kind, reason = "cut_off", "cut off: the answer reached max_tokens"
            elif prepared is None:
                kind, reason = "no_words", "no words to compare"
            else:
                score, row = index.closest(prepared)
                if score > self.config.similarity.max:
                    similar = index.labels[row]
                    method, limit = self.config.similarity.method, self.config.similarity.max
                    kind, reason = "similar", f"too similar to {similar[0]} ({method} {score:.2f} > {limit})"
            if kind is None:
                stats["prompts"] += 1
                prompt_id = f"si-{stats['prompts']:06d}"
                index.add(prompt_id, text, prepared)
                line = {"id": prompt_id, "prompt": text, "attributes": {"source": "self_instruct"}}
                accepted_file.write(json.dumps(line, ensure_ascii=False) + "\n")
                accepted_file.flush()
                continue
            stats["rejected"] += 1
            stats["rejected_by"][kind] = stats["rejected_by"].get(kind, 0) + 1
            line = {"prompt": text, "rejected_by": kind, "reason": reason, "round": round_index,
                    "score": None if score is None else round(score, 4),
                    "similar_id": similar[0] if similar else None, "similar_prompt": similar[1] if similar else None}
            rejected_file.write(json.dumps(line, ensure_ascii=False) + "\n")
            rejected_file.flush()


async def write_prompts(config: SelfInstructConfig, env: SourceEnv) -> Path:
    """New prompts written by the teacher, through the run's asker (the prompt-source signature,
    factory/sources.py); the expansion's figures go to the manifest."""
    assert env.asker is not None, "self-instruct asks the teacher: the run hands it an asker"
    expansion = Expansion(config, env.run_dir, asker=env.asker, console=env.console)
    path = await expansion.run()
    env.figures = expansion.stats
    return path
