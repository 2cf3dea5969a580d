"""A run split into shards, for the Ray runner (factory/ray_runner.py): which shard each prompt belongs to,
the shards' prompt files, and the merge of their records into the run directory's own files.

    run_dir/prompts (the source's file) ─▶ shards/00000/prompts.jsonl … ─▶ (one factory run per shard) ─▶
    shards/0000k/{accepted,rejected,failed}.jsonl, cache.sqlite, manifest.json ─▶ merge ─▶ run_dir/*.jsonl

A prompt's shard is a hash of its id modulo the shard count, so it is the same on every run of the
directory: its cached answer and its records are always found where it is made again. Each shard is a run
directory of its own, with the resume guarantees of any run. The merged files are derived: rewritten whole
(and atomically) after every run, from the shards, which are the truth.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Iterator

from quality_checks import Check, Verdict

from .logprobs import META, SIDECAR
from .prompts import iter_prompt_lines
from .records import CheckResult, Sample
from .store import ACCEPTED, FAILED, REJECTED

SHARDS = "shards"
PROMPTS = "prompts.jsonl"
CHUNK = 256  # accepted samples of one shard checked at once against the earlier shards (semantic_dup batches)
_SAMPLE_FIELDS = {f.name for f in fields(Sample)}


def shard_of(prompt_id: str, shards: int) -> int:
    """The shard of a prompt: a hash of its id (not Python's hash(), which changes between processes)."""
    digest = hashlib.blake2b(prompt_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def shard_dir(run_dir: Path, index: int) -> Path:
    return run_dir / SHARDS / f"{index:05d}"


def split_prompts(prompts_path: Path, run_dir: Path, shards: int, system: str | None,
                  limit: int | None = None) -> list[int]:
    """Write each shard's prompts file (the run's lines unchanged, in order; with `limit`, of the first
    `limit` prompts) and return how many prompts each got. Every run writes them again, atomically, and
    the same: a shard's prompts never change for a directory."""
    dirs = [shard_dir(run_dir, index) for index in range(shards)]
    handles: list[IO[str]] = []
    try:
        for directory in dirs:
            directory.mkdir(parents=True, exist_ok=True)
            handles.append(open(directory / (PROMPTS + ".tmp"), "w", encoding="utf-8"))
        counts = [0] * shards
        for number, (item, raw) in enumerate(iter_prompt_lines(prompts_path, system)):
            if limit is not None and number >= limit:
                break
            index = shard_of(item.id, shards)
            handles[index].write(raw if raw.endswith("\n") else raw + "\n")
            counts[index] += 1
    finally:
        for handle in handles:
            handle.close()
    for directory in dirs:
        os.replace(directory / (PROMPTS + ".tmp"), directory / PROMPTS)
    return counts


@dataclass
class Merged:
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    rejected_by: Counter = field(default_factory=Counter)
    across_shards: int = 0  # accepted in its shard, rejected by a run-wide check against an earlier shard


def _whole_lines(path: Path) -> Iterator[str]:
    """The whole lines of a shard's file; a torn last line (a worker killed as it wrote, and not run
    again since) is not part of the run yet: its shard's next run cuts it and makes the sample again."""
    if not path.exists():
        return
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n"):
                yield line


async def merge_shards(run_dir: Path, shards: int, checks: list[Check]) -> Merged:
    """Write the run directory's accepted, rejected and failed files from its shards, shard by shard.

    Each shard's accepted samples passed the run-wide checks (dedup) against its own shard; here they are
    checked against the samples kept from the shards before it, and a duplicate moves to rejected with
    the check's reason, recorded the way a single-process run records it (see `_reject`)."""
    run_wide = [check for check in checks if check.run_wide]
    # A single-process run with a check that awaits checks every sample first and runs the dedup checks
    # again just before the write: a duplicate caught then is appended after the checks that ran.
    appended = any(check.awaits for check in checks)
    merged = Merged()
    names = (ACCEPTED, REJECTED, FAILED)
    outputs = {name: open(run_dir / (name + ".merge"), "w", encoding="utf-8") for name in names}
    try:
        for index in range(shards):
            directory = shard_dir(run_dir, index)
            for line in _whole_lines(directory / FAILED):
                outputs[FAILED].write(line)
                merged.failed += 1
            lines = _whole_lines(directory / ACCEPTED)
            if not run_wide:
                for line in lines:
                    outputs[ACCEPTED].write(line)
                    merged.accepted += 1
            else:
                before = merged.across_shards
                for chunk in _chunks(lines):
                    await _merge_chunk(chunk, run_wide, appended, outputs, merged)
                if merged.across_shards > before:
                    # Some samples this shard's duplicates name were rejected just now: name the kept ones.
                    await _rename_kept(directory / REJECTED, run_wide, outputs[REJECTED], merged)
                    continue
            for line in _whole_lines(directory / REJECTED):
                outputs[REJECTED].write(line)
                merged.rejected += 1
                merged.rejected_by[json.loads(line).get("rejected_by")] += 1
        for check in run_wide:
            check.flush()
    finally:
        for handle in outputs.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
    for name in names:
        os.replace(run_dir / (name + ".merge"), run_dir / name)
    return merged


def _chunks(lines: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parse(line: str) -> Sample:
    return Sample.from_dict({key: value for key, value in json.loads(line).items() if key in _SAMPLE_FIELDS})


async def _rename_kept(path: Path, run_wide: list[Check], output: IO[str], merged: Merged) -> None:
    """Copy a shard's rejected records, checking its duplicates again against the samples kept: one that
    named a sample the merge rejected names the kept one instead, as a single-process run would. (A
    near-duplicate of a near-duplicate may match nothing kept; it stays rejected with its first reason,
    since the checks after the one it failed never ran on it.)"""
    by_name = {check.name: check for check in run_wide}
    for chunk in _chunks(_whole_lines(path)):
        samples = [_parse(line) for line in chunk]
        checked = [(pos, by_name[sample.rejected_by]) for pos, sample in enumerate(samples)
                   if sample.rejected_by in by_name]
        verdicts = await asyncio.gather(*(check.averdict(samples[pos]) for pos, check in checked))
        renamed = {pos: verdict for (pos, _), verdict in zip(checked, verdicts) if not verdict.passed}
        for pos, (line, sample) in enumerate(zip(chunk, samples)):
            merged.rejected += 1
            merged.rejected_by[sample.rejected_by] += 1
            verdict = renamed.get(pos)
            if verdict is None:
                output.write(line)
                continue
            failed = next(result for result in reversed(sample.checks) if result.name == sample.rejected_by)
            failed.reason, failed.score = verdict.reason, verdict.score
            output.write(sample.to_json() + "\n")


async def _merge_chunk(lines: list[str], run_wide: list[Check], appended: bool, outputs: dict[str, IO[str]],
                       merged: Merged) -> None:
    """Check a chunk of one shard's accepted samples against the samples kept before it, then remember the
    ones kept. The samples of one shard are no duplicates of each other (their shard checked them), so
    checking a chunk at once gives what checking them one by one would."""
    samples = [_parse(line) for line in lines]
    failing: dict[int, tuple[Check, Verdict]] = {}
    for check in run_wide:
        todo = [pos for pos in range(len(samples)) if pos not in failing]
        verdicts = await asyncio.gather(*(check.averdict(samples[pos]) for pos in todo))
        for pos, verdict in zip(todo, verdicts):
            if not verdict.passed:
                failing[pos] = (check, verdict)
    for pos, (line, sample) in enumerate(zip(lines, samples)):
        if pos in failing:
            check, verdict = failing[pos]
            _reject(sample, check.name, verdict, appended)
            outputs[REJECTED].write(sample.to_json() + "\n")
            merged.rejected += 1
            merged.across_shards += 1
            merged.rejected_by[check.name] += 1
            continue
        outputs[ACCEPTED].write(line)
        merged.accepted += 1
        for check in run_wide:
            check.remember(sample)


def _reject(sample: Sample, name: str, verdict: Verdict, appended: bool) -> None:
    """Record a duplicate found across shards as the single-process run records it. Without a check that
    awaits, its checks stop at the first failure: the result list ends with this check's failure in its
    place. With one, every check ran first and the dedup failure comes after them (best_of's verdict, made
    after that recheck, is dropped: the sample was never ranked as a kept one)."""
    result = CheckResult(name, False, verdict.reason, verdict.score)
    checks = sample.checks
    if appended:
        if checks and checks[-1].name == "best_of":
            checks.pop()
    else:
        at = next((pos for pos, done in enumerate(checks) if done.name == name), len(checks))
        del checks[at:]
    checks.append(result)
    sample.rejected_by = name


def merge_sidecars(run_dir: Path, shards: int) -> int:
    """Gather the shards' logprobs sidecars (factory/logprobs.py) into the run directory's, where the trainer
    reads them: every shard's Arrow files, hard-linked (copied across file systems) under names that keep
    them apart, and one meta.json (the shards' are the same: one recipe). A finished shard holds only
    Arrow files; the journal of an interrupted one is not gathered (its next run writes it into a file).
    Rebuilt whole after every run, like the JSONL files. Returns the number of Arrow files."""
    sources = [(index, shard_dir(run_dir, index) / SIDECAR) for index in range(shards)]
    sources = [(index, source) for index, source in sources if (source / META).is_file()]
    if not sources:
        return 0
    building = run_dir / (SIDECAR + ".merge")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    shutil.copyfile(sources[0][1] / META, building / META)
    files = 0
    for index, source in sources:
        for arrow in sorted(source.glob("shard-*.arrow")):
            target = building / f"shard-{index:05d}-{arrow.name[len('shard-'):]}"
            try:
                os.link(arrow, target)
            except OSError:
                shutil.copyfile(arrow, target)
            files += 1
    target = run_dir / SIDECAR
    old = run_dir / (SIDECAR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(building, target)
    shutil.rmtree(old, ignore_errors=True)
    return files
