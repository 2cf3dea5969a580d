"""`apprentice export RUN_DIR --format F --out DIR`: a run's samples as a dataset other tools read, with a card.

The samples are the ones the trainer reads (`sft.data.read_run`): accepted.jsonl less the demoted samples,
plus the promoted ones from rejected.jsonl (review.jsonl decides); `rejected=True` exports the complement
(rejected less promoted, plus demoted). Formats:

- `messages`: JSONL, `{"messages": [...prompt, ...completion]}` (the chat format of TRL, Axolotl, OpenAI)
- `sharegpt`: JSONL, `{"conversations": [{"from": "system|human|gpt", "value": ...}]}`
- `alpaca`: JSONL, `{"instruction", "input": "", "output", "system"?}`; single-turn only: a sample whose
  prompt has more than one user message (or an assistant turn) stops the export with its id, nothing kept
- `parquet`: TRL's prompt–completion columns (`id`, `prompt`, `completion`) via `datasets`
- `hf`: the same columns, `datasets.Dataset.save_to_disk` (read back with `load_from_disk`)
- `axolotl-kd`, `distillkit`: with the teacher's top-k token logprobs from the run's sidecar, for Axolotl's
  and DistillKit's offline distillation (factory/kd_export.py)

The JSONL formats stream (one record in memory at a time); parquet and hf go through `datasets`' Arrow
writer from a generator, in a temporary cache. Every export writes `README.md`, a dataset card: teacher,
prompt source, counts by check, diversity (`factory.stats.compute_stats`) and the teacher's terms of use.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from apprentice.errors import ApprenticeError

from .kd_export import KD_FORMATS, WRITERS, KDExportError, kd_card_lines
from .review_ledger import ReviewError, reviewed_records
from .stats import compute_stats
from .store import ACCEPTED, REJECTED, read_manifest

FORMATS = ("messages", "sharegpt", "alpaca", "parquet", "hf") + KD_FORMATS
JSONL_FORMATS = ("messages", "sharegpt", "alpaca")
DATA_JSONL = "data.jsonl"
DATA_PARQUET = "data.parquet"
CARD = "README.md"
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportError(ApprenticeError):
    """An export that cannot be made; the message names the run, sample or folder and the fix."""


class HubPushError(ExportError):
    """The export is written but the Hub push failed (offline, no token, no access); it can be pushed later."""

    exit_code = 1


@dataclass
class ExportResult:
    out: Path
    format: str
    samples: int
    data: Path  # the data file or folder
    card: Path
    pushed: str | None = None  # the Hub dataset repo's URL
    without_logprobs: int = 0  # KD formats: samples left out for want of the teacher's logprobs
    cut_off: int = 0  # axolotl-kd: samples left out because the teacher did not finish them


def iter_samples(run_dir: Path, *, rejected: bool = False) -> Iterator[dict[str, Any]]:
    """The run's records after review, streamed: accepted (less demoted, plus promoted) or, with
    `rejected`, rejected (less promoted, plus demoted). Only review.jsonl's decisions are held in memory."""
    try:
        for _, _, record in reviewed_records(run_dir, rejected=rejected):
            yield record
    except ReviewError as exc:
        raise ExportError(str(exc)) from None


def to_messages(record: dict[str, Any]) -> dict[str, Any]:
    return {"messages": record["prompt"] + record["completion"]}


def to_sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    return {"conversations": [{"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]}
                              for m in record["prompt"] + record["completion"]]}


def to_alpaca(record: dict[str, Any]) -> dict[str, Any]:
    system = [m["content"] for m in record["prompt"] if m["role"] == "system"]
    turns = [m for m in record["prompt"] if m["role"] != "system"]
    answer = [m for m in record["completion"] if m["role"] == "assistant"]
    if len(turns) != 1 or turns[0]["role"] != "user" or len(system) > 1 or len(answer) != 1:
        raise ExportError(
            f"sample {record['id']}: alpaca holds one instruction and one answer, and this prompt has "
            f"{len(turns)} turn(s) besides the system message; export it as --format messages or sharegpt, "
            f"or demote it (`factory review --demote {record['id']}`)"
        )
    row = {"instruction": turns[0]["content"], "input": "", "output": answer[0]["content"]}
    if system:
        row["system"] = system[0]
    return row


CONVERT = {"messages": to_messages, "sharegpt": to_sharegpt, "alpaca": to_alpaca}


def _features():
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    return Features({"id": Value("string"), "prompt": message, "completion": message})


def _columns(run_dir: str, rejected: bool) -> Iterator[dict[str, Any]]:
    for record in iter_samples(Path(run_dir), rejected=rejected):
        yield {"id": record["id"], "prompt": record["prompt"], "completion": record["completion"]}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; give --out a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out}: folder is not empty; give --out a new or empty folder (nothing was written)")


def export_run(run_dir: Path, fmt: str, out: Path, *, rejected: bool = False,
               push_to_hub: str | None = None, private: bool = True) -> ExportResult:
    """Write the run's samples in `fmt` into the new or empty folder `out`, and a dataset card; with
    `push_to_hub` ("owner/name"), upload that folder to a Hub dataset repo (private unless told)."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if push_to_hub is not None:
        if fmt == "hf":
            raise ExportError("--push-to-hub: the hf format is a save_to_disk folder, which the Hub does not "
                              "load; push --format parquet (or a JSONL format) instead")
        if push_to_hub.count("/") != 1 or not all(push_to_hub.split("/")):
            raise ExportError(f"--push-to-hub {push_to_hub!r}: give a dataset repo as OWNER/NAME")
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: run directory not found")
    if not (run_dir / ACCEPTED).exists() and not (run_dir / REJECTED).exists():
        raise ExportError(f"{run_dir}: no accepted.jsonl or rejected.jsonl; run `python -m factory generate` first")
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    left_out = cut_off = 0
    try:
        if fmt in JSONL_FORMATS:
            data, count = out / DATA_JSONL, _write_jsonl(run_dir, fmt, out / DATA_JSONL, rejected)
        elif fmt in KD_FORMATS:
            data = out / (DATA_JSONL if fmt == "axolotl-kd" else DATA_PARQUET)
            counts = WRITERS[fmt](run_dir, data, rejected)
            count, left_out, cut_off = counts["exported"], counts["without_logprobs"], counts.get("cut_off", 0)
        else:
            data, count = _write_arrow(run_dir, fmt, out, rejected)
        card = out / CARD
        card.write_text(dataset_card(run_dir, fmt, count, rejected=rejected), encoding="utf-8")
    except KDExportError as exc:
        _clear(out)
        raise ExportError(str(exc)) from None
    except BaseException:
        _clear(out)  # no half export: the folder is left empty, as it was found
        raise
    result = ExportResult(out, fmt, count, data, card, without_logprobs=left_out, cut_off=cut_off)
    if push_to_hub is not None:
        result.pushed = push_folder(out, push_to_hub, private=private)
    return result


def push_folder(out: Path, repo: str, *, private: bool = True) -> str:
    """Upload the export folder to the Hub dataset repo `repo` (created if missing); its URL. Any failure
    (offline, no token, no access) is one HubPushError; the export on disk is kept either way."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset",
                          commit_message="Apprentice export")
    except Exception as exc:  # huggingface_hub raises HTTP, offline, auth and OS errors alike
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise HubPushError(
            f"pushing {out} to the Hub dataset {repo} failed: {first}; the export is written in {out}: push it "
            f"later with `hf upload {repo} {out} --repo-type dataset` once online and logged in (`hf auth login`)"
        ) from None
    return str(url)


def _write_jsonl(run_dir: Path, fmt: str, path: Path, rejected: bool) -> int:
    convert = CONVERT[fmt]
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in iter_samples(run_dir, rejected=rejected):
            handle.write(json.dumps(convert(record), ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_arrow(run_dir: Path, fmt: str, out: Path, rejected: bool) -> tuple[Path, int]:
    from datasets import Dataset

    # A fresh cache each time: from_generator's cache key does not see the run's files change.
    with tempfile.TemporaryDirectory(prefix="apprentice-export-") as cache:
        dataset = Dataset.from_generator(
            _columns, gen_kwargs={"run_dir": str(run_dir), "rejected": rejected},
            features=_features(), cache_dir=cache,
        )
        if fmt == "parquet":
            dataset.to_parquet(str(out / DATA_PARQUET))
            data = out / DATA_PARQUET
        else:
            dataset.save_to_disk(str(out))
            data = out
        count = len(dataset)
        del dataset
    return data, count


def _clear(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _teacher(run_dir: Path, manifest: dict[str, Any]) -> tuple[str, str]:
    teacher = ((manifest.get("recipe") or {}).get("teacher")) or {}
    if not teacher:
        for record in iter_samples(run_dir):
            teacher = record.get("teacher") or {}
            break
    return str(teacher.get("provider") or "unknown"), str(teacher.get("model") or "unknown")


def _prompt_source(manifest: dict[str, Any]) -> str:
    prompts = (manifest.get("recipe") or {}).get("prompts") or {}
    for key in ("path", "grid", "dataset", "self_instruct"):
        value = prompts.get(key)
        if value:
            shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
            return f"{key}: `{shown}`"
    return "unknown (no manifest.json with the recipe in the run directory)"


def dataset_card(run_dir: Path, fmt: str, exported: int, *, rejected: bool = False) -> str:
    """The export's README.md: what the data is, where it came from, its figures and the terms on it."""
    manifest = read_manifest(run_dir) or {}
    stats = compute_stats(run_dir, manifest)
    provider, model = _teacher(run_dir, manifest)
    counts, review, div = stats["counts"], stats["review"], stats["diversity"]
    which = ("rejected samples (rejected less promoted, plus demoted)" if rejected
             else "accepted samples (accepted less demoted, plus promoted), as `apprentice train` reads them")
    files = {"parquet": DATA_PARQUET, "distillkit": DATA_PARQUET, "hf": "`datasets` save_to_disk folder (load_from_disk)"}
    front = ""
    if fmt != "hf":  # the Hub reads the data file this names
        front = (f"---\ntags:\n- synthetic\n- distillation\n- apprentice\nconfigs:\n- config_name: default\n"
                 f"  data_files: {files.get(fmt, DATA_JSONL)}\n---\n\n")
    lines = [
        f"# {run_dir.name}: {exported} {'rejected' if rejected else 'accepted'} samples ({fmt})",
        "",
        f"Exported from the Apprentice factory run `{run_dir}`: the {which}.",
        "",
        "| | |", "|---|---|",
        f"| teacher | {_cell(provider)} / `{_cell(model)}` |",
        f"| prompts | {_cell(_prompt_source(manifest))} |",
        f"| format | {fmt} (`{files.get(fmt, DATA_JSONL)}`) |",
        f"| samples in this export | {exported} |",
        "| run before review: accepted / rejected / failed | "
        f"{counts['accepted']} / {counts['rejected']} / {counts['failed']} |",
        f"| review: promoted / demoted | {review['promoted']} / {review['demoted']} |",
        f"| run fingerprint | `{manifest.get('fingerprint_hash') or 'unknown'}` |",
        "",
        "## Rejected, by check (before review)",
        "",
    ]
    if stats["rejected_by"]:
        lines += ["| check | samples | most common reason |", "|---|---:|---|"]
        for name, item in stats["rejected_by"].items():
            reason = item["top_reasons"][0][0] if item["top_reasons"] else ""
            lines.append(f"| {name} | {item['count']} | {_cell(reason)} |")
    else:
        lines.append("No sample was rejected.")
    if fmt in KD_FORMATS:
        lines += ["", *kd_card_lines(run_dir, fmt)]
    lines += [
        "",
        f"## Diversity (accepted completions of the run, sample of {div['sample']})",
        "",
        f"- distinct-1: {div['distinct_1']}",
        f"- distinct-2: {div['distinct_2']}",
        f"- mean pairwise MinHash Jaccard distance ({div['pairwise_sample']} completions): "
        f"{div['mean_pairwise_jaccard_distance']}",
        "",
        "## Licence and terms of use",
        "",
        f"The completions were written by a model ({provider} / `{model}`). The teacher provider's terms of use "
        "govern what you may do with its outputs, including training other models on them; some providers "
        "forbid using outputs to build competing models. Read those terms before you train on or publish this "
        "data. The prompts keep the licence of their source.",
        "",
    ]
    return front + "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:120]
