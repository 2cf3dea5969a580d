"""Attribute grids: prompts from a template × lists of attribute values, sampled without replacement.

    prompts:
      grid:
        template: "Write a {format} about {topic} for {persona}."
        attributes:
          topic: [volcanoes, tax law, sourdough]           # a list …
          persona: {path: data/seeds/personas.txt}         # … or a file, one value a line
          format: {values: [poem, memo], weights: [1, 3]}  # … with weights
        count: 500                                         # default: every combination
        seed: 0

The grid is written once into the run directory as `prompts.grid.jsonl` (the same seed gives the same
file, so a resumed run sees the same prompts) and the run reads it like any prompts file; every record
carries its attribute values in `attributes`, so `factory stats` shows the coverage.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from apprentice.hashing import canonical_json, stable_hash

from .prompt_config import GridConfig
from .prompts import PromptError, SourceEnv

GRID_FILE = "prompts.grid.jsonl"
EXACT_LIMIT = 1_000_000  # up to this many combinations, weighted sampling is exact


def _combination(index: int, sizes: list[int]) -> list[int]:
    picks = []
    for size in reversed(sizes):
        index, pick = divmod(index, size)
        picks.append(pick)
    return picks[::-1]


def sample(config: GridConfig) -> list[list[int]]:
    """Value indices of the drawn combinations, without replacement, weighted by the product of weights.

    Exact (Efraimidis–Spirakis keys u^(1/w) over every combination) up to EXACT_LIMIT combinations;
    beyond that, weighted draws with duplicates skipped, which is close when count ≪ combinations.
    """
    attributes = config.resolved()
    sizes = [len(values) for _, values, _ in attributes]
    total = math.prod(sizes)
    count = min(config.count or total, total)
    rng = random.Random(config.seed)
    if total <= EXACT_LIMIT:
        def key(index: int) -> float:
            weight = math.prod(attributes[a][2][pick] for a, pick in enumerate(_combination(index, sizes)))
            return rng.random() ** (1.0 / weight)

        keys = [(key(index), index) for index in range(total)]
        keys.sort(reverse=True)
        return [_combination(index, sizes) for _, index in keys[:count]]
    drawn: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    while len(out) < count:
        picks = tuple(rng.choices(range(len(values)), weights=weights)[0] for _, values, weights in attributes)
        if picks not in drawn:
            drawn.add(picks)
            out.append(list(picks))
    return out


def write_grid(config: GridConfig, run_dir: Path) -> Path:
    """Write the drawn prompts as a prompts file in the run directory (atomically); return its path."""
    attributes = config.resolved()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / GRID_FILE
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for picks in sample(config):
            values = {attributes[a][0]: attributes[a][1][pick] for a, pick in enumerate(picks)}
            prompt = config.template.format(**values)
            line = {"id": stable_hash(canonical_json(values), length=16), "prompt": prompt, "attributes": values}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


async def write_prompts(config: GridConfig, env: SourceEnv) -> Path:
    """The grid as a prompts file in the run directory (the prompt-source signature, factory/sources.py)."""
    try:
        return write_grid(config, env.run_dir)
    except ValueError as exc:
        raise PromptError(f"factory.prompts.{exc}") from None
