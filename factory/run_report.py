"""What a run leaves for the user: its result, its directory's compatibility with the recipe, the teacher in
one line, the statistics and counts for the manifest, and the figures printed at the end. The single-process
run (factory/run.py), the Ray driver (factory/ray_runner.py) and the plan (factory/plan.py) share them.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from apprentice import __version__
from apprentice.console import CommandConsole
from apprentice.errors import RecipeError

from .progress import Counters, summary_line
from .recipe import FactoryConfig, TeacherConfig
from .stats import compute_stats
from .store import ACCEPTED, FAILED, REJECTED, read_manifest

RUN_LOG = "run.log"  # what the terminal showed, each run appended (factory generate's transcript)


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


def describe_teacher(teacher: TeacherConfig) -> str:
    """The teacher in one line: provider, model, where it runs, the mode and the sampling parameters."""
    where = f"at {teacher.base_url}" if teacher.base_url else {
        "openai": "at api.openai.com", "anthropic": "at api.anthropic.com",
        "local": f"in this process ({teacher.device or 'auto device'})", "vllm": "in this process (vLLM)"}[teacher.provider]
    mode = f"batch at {teacher.batch.discount:g}× the price" if teacher.mode == "batch" else "online"
    params = ", ".join(f"{key} {value}" for key, value in teacher.params.items())
    if teacher.param_ranges is not None:
        params += "; drawn per sample: " + ", ".join(f"{key} {low:g}–{high:g}"
                                                     for key, (low, high) in teacher.param_ranges.ranges().items())
    return f"{teacher.provider} {teacher.model} {where} · {mode} · {params}"


def run_stats(run_dir: Path, manifest: dict[str, Any], console: Console) -> dict[str, Any]:
    """The `stats` figures for the manifest: one streaming pass over the run files, bounded memory."""
    try:
        return compute_stats(run_dir, manifest)
    except Exception as exc:  # noqa: BLE001 - the final manifest matters more than its statistics
        console.print(f"[yellow]stats not computed ({escape(f'{type(exc).__name__}: {exc}')}); "
                      "run `python -m factory stats`[/]")
        return {"error": f"{type(exc).__name__}: {exc}"}


def count_rejected(path: Path) -> Counter:
    counts: Counter = Counter()
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            counts[json.loads(line).get("rejected_by")] += 1
    return counts


def print_result(result: RunResult, console: CommandConsole, run_dir: Path) -> None:
    """The run's figures; when it did not complete, the last line says why and what to do (shown with -q)."""
    console.print(f"this run: {summary_line(result.counters)}", highlight=False)
    counts = (read_manifest(run_dir) or {}).get("counts", {})
    by = counts.get("rejected_by") or {}
    reasons = ", ".join(f"{name} {n}" for name, n in sorted(by.items(), key=lambda kv: -kv[1]))
    console.print(
        escape(f"{run_dir}: {counts.get('accepted', 0)} accepted, {counts.get('rejected', 0)} rejected"
               + (f" ({reasons})" if reasons else "")
               + f", {counts.get('failed', 0)} failed — {ACCEPTED}, {REJECTED}, {FAILED}, manifest.json, {RUN_LOG}"),
        highlight=False,
    )
    if not result.ok:
        console.final(f"[yellow]{escape(result.message)}[/]")
