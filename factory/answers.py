"""Answers to a list of prompts through a factory run: the public way for other stages (eval's hosted
models, its judge) to ask a model with the factory's cache, rate limits, retries and prices.

    answers = answer_prompts(teacher, [{"id": "q1", "prompt": "..."}], folder, name="gpt-4o")

The run lives in `folder/NAME-<settings hash>/`: the same settings find their cache again (a second call
pays nothing), other settings start a new directory instead of being refused. No checks run: every answer
is kept, and a request that failed after retries comes back with its error.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from .prompt_config import PromptsConfig
from .recipe import FactoryConfig
from .run import Run
from .store import ACCEPTED, FAILED, REJECTED


@dataclass
class Answer:
    text: str
    output_tokens: int = 0
    finish_reason: str | None = None
    cost_usd: float = 0.0
    error: str | None = None


@dataclass
class Answers:
    by_id: dict[str, Answer] = field(default_factory=dict)
    status: str = "complete"  # the run's status (budget_exhausted, interrupted, ... leave some unanswered)
    run_dir: Path | None = None
    # What this call paid (the run's manifest `this_run`: answers from the cache cost nothing again).
    spent: dict[str, float] = field(default_factory=dict)


def answer_prompts(teacher: dict[str, Any], prompts: list[dict[str, Any]], folder: Path, *, name: str,
                   system: str | None = None, console: Console | None = None) -> Answers:
    """Ask `teacher` (a `factory.teacher` mapping) every prompt line ({id, prompt}) once."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.prompts.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for line in prompts:
            handle.write(json.dumps(line) + "\n")
    config = FactoryConfig(output_dir=folder, prompts=PromptsConfig(path=path, system=system), samples_per_prompt=1,
                           teacher=teacher, checks=[])
    run_dir = config.output_dir = folder / f"{name}-{config.fingerprint_hash()[:10]}"
    result = asyncio.run(Run(config, console=console).execute())
    answers = Answers(status=result.status, run_dir=run_dir, spent=_spent(run_dir))
    for record in _records(run_dir, ACCEPTED, REJECTED):
        usage = record["usage"]
        answers.by_id[record["prompt_id"]] = Answer(record["completion"][0]["content"], usage.get("output_tokens", 0),
                                                    record.get("finish_reason"), usage.get("cost_usd", 0.0))
    for record in _records(run_dir, FAILED):
        answers.by_id.setdefault(record["prompt_id"], Answer("", error=record["error"]))
    return answers


SPENT_KEYS = ("requests", "input_tokens", "output_tokens", "cost_usd")


def _spent(run_dir: Path) -> dict[str, float]:
    path = run_dir / "manifest.json"
    this_run = json.loads(path.read_text(encoding="utf-8")).get("this_run", {}) if path.is_file() else {}
    return {key: this_run.get(key, 0) for key in SPENT_KEYS}


def _records(run_dir: Path, *names: str) -> Iterator[dict[str, Any]]:
    for name in names:
        path = run_dir / name
        if path.exists():
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)
