"""On-policy distillation, the parts that need no torch: the teacher, the prompts, the guards, the figures.

`sft.method: on_policy` trains the student on its own samples: for each prompt of the data runs the student
samples a completion, the teacher scores every token of that completion (its full next-token distribution,
in this process), and the student minimises the per-token divergence to it (reverse KL at `beta: 1`). A teacher
behind a vLLM server of one's own (`provider: openai` with one `base_url`) scores the sampled tokens over HTTP
instead, and the loss is the sampled-token estimate of the reverse KL (sft/on_policy_trainer.py). The
trainer is TRL's `DistillationTrainer` (TRL 1.16; sft/on_policy_trainer.py subclasses it), which sees the
teacher only through its hidden states, so the teacher must share the student's tokenizer.

Privileged context. With `use_context` (the default) the teacher scores the student's completion with its
`teacher.context` (instructions, worked examples) in front of the prompt, while the student sees the bare
prompt: the student learns to answer as the teacher does with a context it never reads. Each dataset row
carries both prompts: `prompt` (the student's) and `teacher_prompt` (the teacher's).

The guards run before any weights load: equal vocabulary sizes, one tokenizer (the same (token, id)
fingerprint) and one chat template (the same rendering of a probe conversation). Each refusal names both
models and the fix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from apprentice.errors import RecipeError
from factory.builtin import resolve_model
from factory.logprobs import tokenizer_fingerprint
from factory.recipe import IN_PROCESS, TeacherConfig
from factory.store import ACCEPTED, FAILED, REJECTED

from .config import SFTConfig
from .data import DataError
from .kd import describe

FIX = ("use a teacher of the student's family (the same tokenizer and chat template), or train with method: sft "
       "(or kd) on the teacher's text, which needs no shared vocabulary")
PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


# ---- the teacher --------------------------------------------------------------------------------------------
def resolve_teacher(config: SFTConfig) -> TeacherConfig:
    """`sft.on_policy.teacher`, or the teacher that wrote the first data run (its manifest's recipe)."""
    assert config.on_policy is not None
    if config.on_policy.teacher is not None:
        teacher = config.on_policy.teacher
    else:
        manifest = Path(config.data[0]) / "manifest.json"
        try:
            recipe = json.loads(manifest.read_text(encoding="utf-8")).get("recipe") or {}
        except (OSError, json.JSONDecodeError):
            recipe = {}
        if "teacher" not in recipe:
            raise RecipeError(
                f"sft.on_policy: no teacher named and {manifest} records none (a run of `factory generate` writes "
                "it): set sft.on_policy.teacher: {provider: local, model: ...}"
            )
        teacher = TeacherConfig(**recipe["teacher"])
    if teacher.provider not in IN_PROCESS and not is_served(teacher):
        raise RecipeError(
            f"sft.on_policy.teacher: provider {teacher.provider} ({teacher.model}) cannot score the student's tokens: "
            "on-policy training needs the teacher in this process (provider local or vllm) or behind a vLLM server "
            "of yours (provider openai with one base_url: it scores with prompt_logprobs); hosted APIs do not "
            "score text they did not write"
        )
    return teacher


def is_served(teacher: TeacherConfig) -> bool:
    """A teacher behind one OpenAI-compatible vLLM server: it scores the student's tokens over HTTP."""
    return teacher.provider == "openai" and isinstance(teacher.base_url, str)


def served_tokenizer(teacher: TeacherConfig) -> str:
    """Where a served teacher's tokenizer is read for the guards: `teacher.logprobs.tokenizer`, else its model
    name (a local folder or a cached model id; load_teacher refuses one it cannot read)."""
    if teacher.logprobs is not None and teacher.logprobs.tokenizer:
        return str(teacher.logprobs.tokenizer)
    return resolve_model(teacher.model)


def teacher_messages(teacher: TeacherConfig, prompt: list[dict[str, str]], use_context: bool) -> list[dict[str, str]]:
    """What the teacher reads before the student's completion: its context (if used), then the prompt."""
    return teacher.with_context(prompt) if use_context else prompt


def check_pair(student_tokenizer: Any, teacher_tokenizer: Any, student_vocab: int, teacher_vocab: int,
               student: str, teacher: str) -> None:
    """Refuse a teacher whose scores cannot be laid on the student's tokens, naming both and the fix."""
    if student_vocab != teacher_vocab:
        raise RecipeError(
            f"sft.on_policy: the student {student} has {student_vocab} logits per token and the teacher {teacher} "
            f"{teacher_vocab}; the divergence compares the two distributions id by id. Fix: {FIX}"
        )
    mine, theirs = tokenizer_fingerprint(student_tokenizer, student), tokenizer_fingerprint(teacher_tokenizer, teacher)
    if mine["vocab_sha256"] != theirs["vocab_sha256"]:
        raise RecipeError(
            f"sft.on_policy: the student's tokenizer is not the teacher's, so one id means two tokens. Student: "
            f"{describe(mine)}; teacher: {describe(theirs)}. Fix: {FIX}"
        )
    rendered = [_render(tokenizer, name) for tokenizer, name in ((student_tokenizer, student),
                                                                 (teacher_tokenizer, teacher))]
    if rendered[0] != rendered[1]:
        raise RecipeError(
            f"sft.on_policy: the student {student} and the teacher {teacher} have different chat templates, so the "
            f"teacher would score the student's answer in a conversation the student never wrote. A system and a "
            f"user message render as {rendered[0]!r} for the student and {rendered[1]!r} for the teacher. Fix: "
            "give both the same chat_template (copy one tokenizer_config.json's into the other), or " + FIX
        )


def _render(tokenizer: Any, name: str) -> str:
    if not tokenizer.chat_template:
        raise RecipeError(f"sft.on_policy: {name} has no chat template; use an instruct model")
    return tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)


def load_teacher(teacher: TeacherConfig, student_tokenizer: Any, config: SFTConfig, dtype: str,
                 console: Any) -> tuple[Any, str]:
    """The teacher's model (eval mode) after the guards, which read only tokenizers and configs; and its path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    settings = config.on_policy
    assert settings is not None
    served = is_served(teacher)
    path = served_tokenizer(teacher) if served else resolve_model(teacher.model)
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if not served:
            raise
        raise RecipeError(
            f"sft.on_policy.teacher: the served model {teacher.model!r} names no tokenizer this machine can read, so "
            "the student's and the teacher's tokens cannot be checked to be the same: set "
            "sft.on_policy.teacher.logprobs.tokenizer to the served model's folder or model id"
        ) from None
    student_vocab = AutoConfig.from_pretrained(resolve_model(config.student)).get_text_config().vocab_size
    # A served teacher's vocabulary is its tokenizer's (its config may not be beside it): the fingerprint decides.
    teacher_vocab = student_vocab if served else AutoConfig.from_pretrained(path).get_text_config().vocab_size
    check_pair(student_tokenizer, teacher_tokenizer, student_vocab, teacher_vocab, config.student, teacher.model)
    if served:
        console.print(escape(f"on_policy teacher {teacher.model} served at {teacher.base_url} (tokenizer {path}), "
                             f"{len(teacher.context or [])} context messages, "
                             f"{'used' if settings.use_context else 'not used'}: scored with prompt_logprobs, the "
                             f"sampled tokens' reverse KL · max_completion_length={settings.max_completion_length}"),
                      highlight=False)
        return None, path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    console.print(escape(f"on_policy teacher {teacher.model} ({len(teacher.context or [])} context messages, "
                         f"{'used' if settings.use_context else 'not used'}) · beta={settings.beta:g} "
                         f"T={settings.temperature:g} max_completion_length={settings.max_completion_length}"),
                  highlight=False)
    return model, path


# ---- the prompts ----------------------------------------------------------------------------------------------
def prompt_splits(config: SFTConfig, teacher: TeacherConfig, held_groups: set[str]) -> tuple[Any, Any]:
    """(train, held-out or None) datasets of prompts: every prompt the data runs asked (accepted, rejected and
    failed alike: on-policy training needs no teacher answer), once each, split as sft splits the samples
    (`held_groups`: the held-out prompts' groups). Training rows repeat `num_generations` times."""
    from datasets import Dataset

    assert config.on_policy is not None
    settings = config.on_policy
    train_rows: list[dict[str, Any]] = []
    eval_rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for run_dir in map(Path, config.data):
        for name in (ACCEPTED, REJECTED, FAILED):
            for record in _records(run_dir / name):
                group = f"{run_dir}:{record.get('prompt_id') or record['id']}"
                if group in seen:
                    continue
                seen.add(group)
                row = {"prompt": record["prompt"],
                       "teacher_prompt": teacher_messages(teacher, record["prompt"], settings.use_context)}
                (eval_rows if group in held_groups else train_rows).append(row)
    if not train_rows:
        raise DataError(f"no prompts to train on in {', '.join(map(str, config.data))} (all held out, or no records)")
    train = Dataset.from_list([row for row in train_rows for _ in range(settings.num_generations)])
    return train, Dataset.from_list(eval_rows) if eval_rows else None


def _records(path: Path):
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "prompt" in record and ("prompt_id" in record or "id" in record):
                    yield record
            except json.JSONDecodeError:
                raise DataError(f"{path}:{number}: not a JSON line; repair or remove it") from None


# ---- starting from a trained student -------------------------------------------------------------------------
def adapter_folder(config: SFTConfig) -> Path:
    """The adapter `sft.init_from` names (a trained student's output_dir, or its adapter/ folder), after checking
    that it was trained on `sft.student`."""
    assert config.init_from is not None
    given = Path(config.init_from)
    folder = given / "adapter" if (given / "adapter" / "adapter_config.json").is_file() else given
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"sft.init_from {given}: no LoRA adapter there (adapter_config.json); name the "
                          "output_dir of an `sft train` run, e.g. runs/sft-demo")
    lineage = folder.parent / "lineage.json"
    if lineage.is_file():
        base = (json.loads(lineage.read_text(encoding="utf-8")).get("base_model") or {}).get("name")
        if base is not None and base != config.student:
            raise RecipeError(f"sft.init_from {given} was trained on {base}, and sft.student is {config.student}: "
                              f"set sft.student: {base}, or train from the base")
    return folder


def start_from(model: Any, config: SFTConfig) -> Any:
    """The student with `sft.init_from`'s adapter loaded, trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_folder(config)), is_trainable=True)


# ---- figures ---------------------------------------------------------------------------------------------------
def figures(trainer: Any, teacher: TeacherConfig, teacher_path: str, config: SFTConfig) -> dict[str, Any]:
    """What lineage.json records of an on-policy run: the teacher, what scoring cost, the last divergences."""
    assert config.on_policy is not None
    history = trainer.state.log_history
    last = next((entry for entry in reversed(history) if "reverse_kl" in entry), {})
    first = next((entry for entry in history if "reverse_kl" in entry), {})
    return {
        "teacher": {"provider": teacher.provider, "model": teacher.model, "path": teacher_path,
                    "context_messages": len(teacher.context or []) if config.on_policy.use_context else 0},
        "scoring": {mode: dict(totals) for mode, totals in trainer.scoring.items()},
        # A teacher in this process, or on a server of one's own, costs compute, not money: its tokens are above.
        "cost_usd": 0.0,
        "reverse_kl_first": first.get("reverse_kl"),
        "reverse_kl_last": last.get("reverse_kl"),
        "settings": config.on_policy.model_dump(mode="json", exclude={"teacher"}),
    }
