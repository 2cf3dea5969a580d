"""Where a run's prompts come from: one of `factory.prompts` path, grid, dataset, self_instruct or served.

Every source has the same signature, `async def write_prompts(config, env: SourceEnv) -> Path`: it
writes a prompts file into the run directory (a path source names its own) and the run reads that file
like any other, so a resumed run sees the same prompts. To add a source: a settings model in
factory/prompt_config.py, a module with `write_prompts`, and a line here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from . import grid, prompt_dataset, self_instruct, served_log
from .prompt_config import PromptsConfig
from .prompts import SourceEnv


async def _named_file(path: Path, env: SourceEnv) -> Path:
    return path


SOURCES: dict[str, Callable[[Any, SourceEnv], Awaitable[Path]]] = {
    "path": _named_file,
    "grid": grid.write_prompts,
    "dataset": prompt_dataset.write_prompts,
    "self_instruct": self_instruct.write_prompts,
    "served": served_log.write_prompts,
}
# Sources that ask the teacher: the run builds its teacher and asker first.
ASKS_TEACHER = {"self_instruct"}


def source_name(prompts: PromptsConfig) -> str:
    """The one source the section names (the config allows exactly one)."""
    return next(name for name in SOURCES if getattr(prompts, name) is not None)


async def write_prompts(prompts: PromptsConfig, env: SourceEnv) -> Path:
    name = source_name(prompts)
    settings = prompts.served_source if name == "served" else getattr(prompts, name)  # served takes `where` too
    return await SOURCES[name](settings, env)
