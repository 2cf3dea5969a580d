"""A trained student's model card (`README.md`), built from its `lineage.json` and, once `eval run` has
scored it, from that eval's `results.json`; and its upload to the Hugging Face Hub.

    STUDENT_DIR/README.md          the card (also in adapter/, replacing PEFT's empty template, and in merged/)

The card says what the student is (base model, LoRA/QLoRA settings, distillation), what it learned from
(each data run with its teacher and sample count), how training went (steps, held-out loss), what it is for,
the licences that bind it (the base model's, and the teacher provider's terms on its outputs) and, when an
eval scored it, the eval table (score and retention with their 95 % intervals, and the gate).

An eval matches the student by model path: a `results.json` whose model points at STUDENT_DIR, its adapter/
or merged/ folder; and when that eval read a lineage, it must be this training's (same start time), so a
table from an earlier training in the same folder is never shown. Text that is not ours (model names, paths,
reasons) is escaped for Markdown, which the Hub renders with HTML.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.errors import ApprenticeError

CARD = "README.md"
LINEAGE = "lineage.json"
RESULTS = "results.json"
# The built-in student's source on the Hub and its licence (SmolLM2 is Apache-2.0 on its model page).
BUILTIN_BASES = {"builtin:smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
TEACHER_TERMS = {
    "openai": "OpenAI's terms of use (https://openai.com/policies/terms-of-use)",
    "anthropic": "Anthropic's terms (https://www.anthropic.com/legal)",
}
_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>|#!~])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CardError(ApprenticeError):
    """A card that cannot be written: no lineage.json where one is expected; the message names the fix."""


class ModelPushError(CardError):
    """The student and its card are written but the Hub upload failed (offline, no token, no access)."""

    exit_code = 1


@dataclass
class Evaluation:
    """One eval's view of this student: the whole results.json, and which of its models the student is."""

    path: Path
    model: str
    results: dict[str, Any]


def text(value: Any) -> str:
    """Text that is not ours, safe in Markdown (and in the HTML the Hub renders): one line, specials escaped."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(value).split()))


def code(value: Any) -> str:
    """Text that is not ours as a code span: Markdown shows its inside as it is (HTML included), so only a
    backtick, which would close it, and a pipe, which would split a table cell, are changed."""
    return "`" + " ".join(str(value).split()).replace("`", "'").replace("|", "\\|") + "`"


def read_lineage(student_dir: Path) -> dict[str, Any]:
    path = Path(student_dir) / LINEAGE
    if not path.is_file():
        raise CardError(f"{path}: not found; a model card is built from a trained student's lineage.json: give the "
                        "sft.output_dir of a finished `apprentice train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CardError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); train again to rewrite it") from None


def find_evaluations(student_dir: Path, lineage: dict[str, Any], search: list[Path] | None = None) -> list[Evaluation]:
    """The evals that scored this student: `results.json` in each folder of `search` (default: the folders
    beside STUDENT_DIR, where runs/eval-demo sits next to runs/sft-demo), newest first."""
    student_dir = Path(student_dir).resolve()
    folders = {student_dir, student_dir / "adapter", student_dir / "merged"}
    paths = [Path(d) / RESULTS for d in search] if search is not None else sorted(student_dir.parent.glob(f"*/{RESULTS}"))
    found = []
    for path in paths:
        if search is not None and not path.is_file():
            raise CardError(f"{path}: not found; --eval names an eval.output_dir where `apprentice eval` wrote its results")
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for name, model in (results.get("models") or {}).items():
            if not isinstance(model, dict) or not model.get("model"):
                continue
            if Path(str(model["model"])).expanduser().resolve() not in folders:
                continue
            seen = model.get("lineage")
            if seen and seen.get("started_at") != lineage.get("started_at"):
                continue  # an earlier training in the same folder
            found.append(Evaluation(path, name, results))
    return sorted(found, key=lambda e: e.path.stat().st_mtime, reverse=True)


def base_licence(lineage: dict[str, Any]) -> tuple[str | None, str | None]:
    """(Hub id of the base model, its licence) where they can be known without the network: the built-in
    student's, or the `license:` of a local or cached model card."""
    base = lineage.get("base_model") or {}
    name, path = str(base.get("name") or ""), str(base.get("path") or "")
    if name in BUILTIN_BASES:
        return BUILTIN_BASES[name]
    hub_id = name if _HUB_ID.match(name) and not Path(name).exists() else None
    readme = Path(path) / CARD if path and Path(path).is_dir() else None
    if readme is None and hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, CARD)
        readme = Path(cached) if isinstance(cached, str) else None
    licence = None
    if readme is not None and readme.is_file():
        front = readme.read_text(encoding="utf-8", errors="replace").split("---")
        if len(front) > 2:
            match = re.search(r"^license:\s*(\S+)", front[1], re.MULTILINE)
            licence = match.group(1).strip("'\"") if match else None
    return hub_id, licence


def _teacher(run_path: str) -> tuple[str, str]:
    """(provider, model) of a data run: from its manifest, else from its first accepted record; "unknown"
    when the run is gone."""
    teacher: dict[str, Any] = {}
    try:
        manifest = json.loads((Path(run_path) / "manifest.json").read_text(encoding="utf-8"))
        teacher = (manifest.get("recipe") or {}).get("teacher") or {}
        if not teacher:
            with (Path(run_path) / "accepted.jsonl").open(encoding="utf-8") as handle:
                teacher = json.loads(handle.readline() or "{}").get("teacher") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return str(teacher.get("provider") or "unknown"), str(teacher.get("model") or "unknown")


def _number(value: Any, digits: int = 4) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _percent(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) or value != value else f"{100 * value:.1f} %"


def eval_section(evaluation: Evaluation) -> list[str]:
    """The eval table: every model's score, the retention of each against the reference, and the gate."""
    results = evaluation.results
    reference = results.get("reference")
    lines = ["## Evaluation", "",
             f"From {code(evaluation.path)} ({results.get('items', '?')} golden items from "
             f"{text(', '.join(map(str, results.get('golden') or [])) or 'unknown')}); this student is "
             f"**{text(evaluation.model)}**. Scores are mean scores in [0, 1] with their 95 % intervals; retention "
             f"is a model's score ÷ {'**' + text(reference) + '**' if reference else 'the reference'}'s.", "",
             "| model | role | score (95 % interval) | retention (95 % interval) |", "|---|---|---|---|"]
    for name, model in (results.get("models") or {}).items():
        overall = (model.get("metrics") or {}).get("overall") or {}
        retention = (model.get("retention") or {}).get("overall") or {}
        score = f"{_number(overall.get('mean'), 3)} [{_number(overall.get('low'), 3)}, {_number(overall.get('high'), 3)}]"
        kept = (f"{_percent(retention.get('ratio'))} [{_percent(retention.get('low'))}, {_percent(retention.get('high'))}]"
                if retention else "—")
        shown = f"**{text(name)}** (this model)" if name == evaluation.model else text(name)
        lines.append(f"| {shown} | {text(model.get('role') or '—')} | {score} | {kept} |")
    gate = results.get("gate")
    lines.append("")
    if gate is None:
        lines.append("No release gate was set (eval.gate).")
    else:
        judged = results.get("student")
        lines.append(f"Release gate ({'on ' + text(judged) if judged else 'student'}): "
                     f"**{'passed' if gate.get('passed') else 'FAILED'}**: {text(gate.get('reason') or '')}.")
    return lines + [""]


def model_card(lineage: dict[str, Any], evaluations: list[Evaluation], *, merged: bool = False) -> str:
    """The README.md of a trained student: `merged` for the merged folder (a full model, not an adapter)."""
    base = lineage.get("base_model") or {}
    sft = lineage.get("sft") or {}
    lora = sft.get("lora") or {}
    distill = sft.get("distill")
    metrics = lineage.get("metrics") or {}
    splits = lineage.get("splits") or {}
    hub_id, licence = base_licence(lineage)
    tags = ["apprentice", "distillation", "lora" if not sft.get("qlora") else "qlora"]
    front = ["---"]
    if hub_id:
        front.append(f"base_model: {json.dumps(hub_id)}")
    front += [f"library_name: {'transformers' if merged else 'peft'}", f"license: {json.dumps(licence or 'other')}",
              "tags:", *(f"- {tag}" for tag in tags), "---", ""]
    method = (f"{'QLoRA (4-bit NF4 base)' if sft.get('qlora') else 'LoRA'}: r={lora.get('r')}, "
              f"alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, target modules "
              f"{text(lora.get('target_modules'))}")
    schedule = (f"learning rate {sft.get('learning_rate')} ({text(sft.get('lr_scheduler'))}), "
                + (f"{sft.get('max_steps')} steps" if sft.get("max_steps") else f"{sft.get('epochs')} epoch(s)")
                + f", batch {sft.get('per_device_batch_size')} × {sft.get('gradient_accumulation_steps')} accumulation")
    lines = [
        f"# {text(Path(str(sft.get('output_dir') or 'student')).name)}: a student of "
        f"{text(base.get('name') or 'unknown')}",
        "",
        f"A {'merged model' if merged else 'LoRA adapter'} fine-tuned with Apprentice (teacher LLM → data → "
        f"student → eval gate) on a teacher's answers{' and its token logprobs' if distill else ''}.",
        "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| base model | {code(base.get('name') or 'unknown')} |",
        f"| method | {method} |",
        f"| schedule | {schedule} |",
    ]
    if distill:
        info = lineage.get("distill") or {}
        lines.append(f"| distillation | loss = α·T²·KL(teacher top-k ‖ student) + (1−α)·CE with α={distill.get('alpha')}, "
                     f"T={distill.get('temperature')}, k={info.get('top_k', '?')}; {info.get('aligned', '?')} of "
                     f"{info.get('samples', '?')} training samples aligned with the teacher's tokens |")
    lines += [f"| trained | {text(lineage.get('started_at') or 'unknown')}, {lineage.get('seconds', '?')} s on "
              f"{text((lineage.get('hardware') or {}).get('device') or 'unknown')} |",
              f"| code | Apprentice {text((lineage.get('versions') or {}).get('apprentice') or '?')}, commit "
              f"{code(lineage.get('git_commit') or 'unknown')} |", ""]
    lines += ["## Training data", "",
              "| run | teacher | samples | fingerprint |", "|---|---|---:|---|"]
    teachers = []
    for run in lineage.get("data") or []:
        provider, model = _teacher(str(run.get("path")))
        teachers.append((provider, model))
        lines.append(f"| {code(run.get('path'))} | {text(provider)} / {code(model)} | {run.get('samples', '?')} | "
                     f"{code(run.get('fingerprint_hash') or 'unknown')} |")
    lines += ["", f"Split: {splits.get('train', '?')} samples trained on, {splits.get('eval', '?')} held out "
                  f"(whole prompts, {splits.get('held_out', '?')} of them, seed {splits.get('seed', '?')}).", "",
              "## Training figures", "",
              f"- optimizer steps: {lineage.get('global_step', '?')}",
              f"- held-out loss (cross-entropy): {_number(metrics.get('eval_loss'))}",
              f"- final train loss: {_number(metrics.get('train_loss'))}"]
    if metrics.get("train_tokens"):
        lines.append(f"- tokens trained on: {int(metrics['train_tokens'])}")
    lines.append("")
    evaluation = evaluations[0] if evaluations else None
    if evaluation is not None:
        lines += eval_section(evaluation)
    else:
        lines += ["## Evaluation", "", "Not evaluated yet: run `apprentice eval RECIPE.yaml` with this student "
                  "among its models, then `apprentice card` on this folder to add the table.", ""]
    lines += ["## Intended use", "",
              "A task-specific student: it was trained only on the prompts and answers of the runs above, to "
              "answer prompts like them at a fraction of the teacher's cost. Check it on your own data before use "
              "(the eval above measures the golden set it names, nothing wider); it is not meant for "
              "high-stakes decisions without a human in the loop.", "",
              "## Licence and terms", "",
              f"- Base model {code(base.get('name') or 'unknown')}: "
              + (f"licence {code(licence)}; its terms apply to this derivative." if licence else
                 "its licence could not be read offline; read the base model's card, whose terms apply to this "
                 "derivative.")]
    for provider, model in sorted(set(teachers)):
        terms = TEACHER_TERMS.get(provider, f"the licence of the teacher model {code(model)}")
        lines.append(f"- Teacher {text(provider)} / {code(model)}: its outputs are governed by {terms}; some "
                     "providers forbid using outputs to develop competing models. Read them before you publish or "
                     "deploy this student.")
    return "\n".join(front + lines) + "\n"


def write_cards(student_dir: Path, search: list[Path] | None = None) -> list[Path]:
    """Write the card into STUDENT_DIR, adapter/ and merged/ (where they exist); the paths written."""
    student_dir = Path(student_dir)
    lineage = read_lineage(student_dir)
    evaluations = find_evaluations(student_dir, lineage, search)
    written = []
    for folder, merged in ((student_dir, False), (student_dir / "adapter", False), (student_dir / "merged", True)):
        if folder.is_dir():
            (folder / CARD).write_text(model_card(lineage, evaluations, merged=merged), encoding="utf-8")
            written.append(folder / CARD)
    return written


def check_repo(repo: str) -> None:
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CardError(f"--push-to-hub {repo!r}: give a model repo as OWNER/NAME")


def push_student(student_dir: Path, repo: str, *, merged: bool = False, private: bool = True) -> str:
    """Upload the adapter (or, with `merged`, the merged model) with the card, lineage.json and the loss
    curves to the Hub model repo `repo` (created if missing), in one commit; its URL. Any failure (offline,
    no token, no access) is one ModelPushError; the student on disk is kept either way."""
    from huggingface_hub import CommitOperationAdd, HfApi

    student_dir = Path(student_dir)
    check_repo(repo)
    weights = student_dir / ("merged" if merged else "adapter")
    if not weights.is_dir():
        raise CardError(f"{weights}: not found; " + ("train with the merged model (the default) or push the adapter "
                                                     "without --merged" if merged else "train the student first"))
    if not (weights / CARD).is_file():
        write_cards(student_dir)
    files = {p.relative_to(weights).as_posix(): p for p in sorted(weights.rglob("*")) if p.is_file()}
    for extra in (LINEAGE, "loss_curves.png"):
        if (student_dir / extra).is_file():
            files.setdefault(extra, student_dir / extra)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    try:
        api = HfApi()
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id=repo, repo_type="model", operations=operations,
                          commit_message=f"Apprentice student ({'merged' if merged else 'LoRA adapter'})")
    except Exception as exc:  # huggingface_hub raises HTTP, offline, auth and OS errors alike
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ModelPushError(
            f"pushing {weights} to the Hub model {repo} failed: {first}; the student is kept in {student_dir}: push "
            f"it later with `apprentice card {student_dir} --push-to-hub {repo}` once online and logged in "
            "(`hf auth login`)"
        ) from None
    return str(url)
