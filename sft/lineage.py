"""Lineage you can check: what a student was trained on and evaluated with, hashed by content, and the
check that recomputes every hash and names what changed since.

`sft train` records, per data run, the content it read: the prompts file's bytes (for a dataset or
self-instruct source, the prompts file the run wrote: the dataset's rows as the run saw them), the ids of the
accepted and of the rejected samples, the review decisions (review.jsonl's bytes), and the run's settings
fingerprint; and the adapter's weights. `eval run` records, in the lineage of each trained student it
evaluates, its scores, latency, cost and gate with the bytes of each golden set. `sft lineage DIR --verify`
recomputes all of them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from apprentice.errors import ApprenticeError
from factory.grid import GRID_FILE
from factory.prompt_dataset import DATASET_FILE
from factory.review_ledger import REVIEW
from factory.self_instruct import PROMPTS_FILE
from factory.store import ACCEPTED, REJECTED, iter_ids, replace_whole

LINEAGE = "lineage.json"
WEIGHTS = (".safetensors", ".bin")


class LineageError(ApprenticeError):
    """A student folder whose lineage cannot be read; the message names the path."""


@dataclass
class Finding:
    """One thing the check compared: `changed` with a sentence that says what, or unchanged."""

    what: str
    changed: bool
    detail: str


def file_hash(path: Path) -> str | None:
    """sha256 of a file's bytes, read in blocks; None when the file does not exist."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _ids(path: Path) -> dict[str, Any]:
    ids = sorted(iter_ids(path))
    return {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()}


def _prompt_files(run_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """The prompts file(s) the run read: the recipe's path, or the file its source wrote into the run."""
    named = ((manifest.get("recipe") or {}).get("prompts") or {}).get("path")
    files = [Path(named)] if named else []
    return files + [run_dir / name for name in (GRID_FILE, DATASET_FILE, PROMPTS_FILE) if (run_dir / name).is_file()]


def run_content(run_dir: Path | str) -> dict[str, Any]:
    """What a data run holds, hashed: its prompts, accepted and rejected ids, review decisions, settings."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    except json.JSONDecodeError:
        manifest = {}
    review = run_dir / REVIEW
    decisions = sum(1 for line in review.read_text(encoding="utf-8").splitlines() if line.strip()) \
        if review.is_file() else 0
    return {
        "prompts": [{"path": str(path), "sha256": file_hash(path)} for path in _prompt_files(run_dir, manifest)],
        "accepted": _ids(run_dir / ACCEPTED),
        "rejected": _ids(run_dir / REJECTED),
        "review": {"decisions": decisions, "sha256": file_hash(review)},
        "settings": manifest.get("fingerprint_hash"),
    }


def files_content(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    return [{"path": str(path), "sha256": file_hash(Path(path))} for path in paths]


def weights_content(folder: Path) -> list[dict[str, Any]]:
    """The weight files of an adapter or model folder, by name."""
    return files_content(sorted(p for p in folder.iterdir() if p.suffix in WEIGHTS)) if folder.is_dir() else []


# ---- reading and writing a student's lineage ----------------------------------------------------------
def lineage_path_for(model_path: Path | str) -> Path | None:
    """A trained student's lineage.json: in the folder eval names, or beside its merged/ or adapter/ folder."""
    for candidate in (Path(model_path) / LINEAGE, Path(model_path).parent / LINEAGE):
        if candidate.is_file():
            return candidate
    return None


def read_lineage(student_dir: Path | str) -> dict[str, Any]:
    path = lineage_path_for(student_dir)
    if path is None:
        raise LineageError(f"{student_dir}: no {LINEAGE} here or beside it; give the folder `sft train` wrote "
                           "(sft.output_dir)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LineageError(f"{path}: not valid JSON ({exc}); it is written by `sft train`") from None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file and a rename: a reader (or a crash) never sees half a lineage."""
    replace_whole(path, json.dumps(data, indent=2) + "\n")


def record_eval(lineage_path: Path, entry: dict[str, Any]) -> None:
    """Add an eval's results to a student's lineage; an eval into the same output folder replaces its entry."""
    lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
    entry = {**entry, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    evals = [e for e in lineage.get("evals") or [] if e.get("eval_dir") != entry.get("eval_dir")]
    lineage["evals"] = evals + [entry]
    write_json_atomic(lineage_path, lineage)


def latest_eval(lineage: dict[str, Any]) -> dict[str, Any] | None:
    evals = lineage.get("evals") or []
    return evals[-1] if evals else None


# ---- the check ------------------------------------------------------------------------------------------
def _short(digest: str | None) -> str:
    return "missing" if digest is None else digest[:12]


def _compare_run(before: dict[str, Any], path: str) -> list[Finding]:
    now = run_content(path)
    found = []
    then_prompts = {p["path"]: p["sha256"] for p in before.get("prompts") or []}
    now_prompts = {p["path"]: p["sha256"] for p in now["prompts"]}
    for name in sorted(then_prompts.keys() | now_prompts.keys()):
        a, b = then_prompts.get(name), now_prompts.get(name)
        detail = (f"{path}: prompts file {name} changed (sha256 {_short(a)} at training, {_short(b)} now)"
                  if a != b else f"{path}: prompts file {name} unchanged")
        found.append(Finding(f"prompts {name}", a != b, detail))
    for kind in ("accepted", "rejected"):
        a, b = before.get(kind) or {}, now[kind]
        changed = a.get("sha256") != b["sha256"]
        if not changed:
            detail = f"{path}: the same {b['count']} {kind} sample(s)"
        elif a.get("count") != b["count"]:
            more = "more" if b["count"] > (a.get("count") or 0) else "fewer"
            detail = f"{path}: {more} {kind} samples: {a.get('count')} at training, {b['count']} now"
        else:
            detail = f"{path}: other {kind} samples: {b['count']} as at training, but not the same ids"
        found.append(Finding(f"{kind} ids", changed, detail))
    a, b = before.get("review") or {}, now["review"]
    changed = a.get("sha256") != b["sha256"]
    if not changed:
        detail = f"{path}: the same {b['decisions']} review decision(s)"
    elif b["decisions"] > (a.get("decisions") or 0):
        detail = (f"{path}: review decision(s) added: {a.get('decisions', 0)} at training, {b['decisions']} now "
                  f"(factory review)")
    else:
        detail = f"{path}: review decisions changed: {a.get('decisions', 0)} at training, {b['decisions']} now"
    found.append(Finding("review decisions", changed, detail))
    if before.get("settings") != now["settings"]:
        found.append(Finding("run settings", True, f"{path}: the run's settings fingerprint changed "
                             f"({before.get('settings')} at training, {now['settings']} now)"))
    return found


def _compare_files(what: str, before: list[dict[str, Any]], since: str) -> list[Finding]:
    found = []
    for item in before:
        now = file_hash(Path(item["path"]))
        changed = now != item["sha256"]
        detail = (f"{what} {item['path']} changed since {since} (sha256 {_short(item['sha256'])} then, "
                  f"{_short(now)} now)" if changed else f"{what} {item['path']} unchanged since {since}")
        found.append(Finding(f"{what} {item['path']}", changed, detail))
    return found


def verify(student_dir: Path | str) -> list[Finding]:
    """Every hash of the student's lineage recomputed: the data runs' content, the adapter's weights, and the
    golden sets of each eval recorded in it. A lineage written before content hashing says so."""
    lineage = read_lineage(student_dir)
    folder = lineage_path_for(student_dir).parent  # type: ignore[union-attr]
    found: list[Finding] = []
    for run in lineage.get("data") or []:
        if "content" not in run:
            found.append(Finding(f"data {run.get('path')}", True, f"{run.get('path')}: trained before content "
                                 "hashing: nothing to compare; train again to record it"))
            continue
        found += _compare_run(run["content"], run["path"])
    found += _compare_files("adapter weights", lineage.get("weights") or [], "training")
    for entry in lineage.get("evals") or []:
        found += _compare_files("golden set", entry.get("golden") or [], f"eval {entry.get('eval_dir')}")
    if not (folder / "adapter").is_dir():
        found.append(Finding("adapter", True, f"{folder / 'adapter'}: missing"))
    return found
