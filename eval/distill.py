"""Figures that only make sense for a student next to its teacher: agreement, divergence, cascade,
speculative decoding with the student as draft."""
from __future__ import annotations

import time
from typing import Any

from apprentice.text import fold_answer
from factory.hf import encode_chat
from factory.logprobs import tokenizer_fingerprint

from .answer import ModelRun
from .golden import GoldenItem


def agreement(student: ModelRun, teacher: ModelRun, keys: list[str]) -> float:
    """Share of golden prompts where both give the same answer (after normalization)."""
    same = sum(fold_answer(student.answers[k].text) == fold_answer(teacher.answers[k].text) for k in keys)
    return same / len(keys) if keys else float("nan")


def share_tokenizer(a: ModelRun, b: ModelRun) -> bool:
    """The same vocabulary, id by id: the fingerprint the logprob sidecar and the trainer use."""
    if a.tokenizer is None or b.tokenizer is None:
        return False
    return tokenizer_fingerprint(a.tokenizer)["vocab_sha256"] == tokenizer_fingerprint(b.tokenizer)["vocab_sha256"]


def divergence(student: ModelRun, teacher: ModelRun, items: list[GoldenItem], limit: int = 64) -> float:
    """Mean per-token KL(teacher ‖ student) along the teacher's own answers.

    Each model sees the prompt as it would in use (the teacher with its context, the student without),
    so this measures how far the student's next-token distribution is from the teacher's where it matters.
    """
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for item in items[:limit]:
            answer = teacher.tokenizer(teacher.answers[item.key].text, add_special_tokens=False)["input_ids"]
            if not answer:
                continue
            rows = []
            for run in (teacher, student):
                prompt = encode_chat(run.tokenizer, run.config.with_context(item.messages))
                ids = torch.tensor([prompt + answer], device=run.model.device)
                logits = run.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().cpu()
                rows.append(torch.log_softmax(logits, dim=-1))
            t, s = rows
            total += float((t.exp() * (t - s)).sum(dim=-1).sum())
            count += len(answer)
    return total / count if count else float("nan")


def cascade(student_conf: dict[str, float | None], student_scores: dict[str, float],
            teacher_scores: dict[str, float], steps: int = 10) -> list[dict[str, float]]:
    """Quality when answers with student confidence below a threshold go to the teacher.

    One point per share routed (0 %, 10 %, … 100 %): the least confident answers are routed first.
    """
    keys = sorted(student_scores, key=lambda k: (student_conf.get(k) is not None, student_conf.get(k) or 0.0))
    points = []
    for step in range(steps + 1):
        routed = round(len(keys) * step / steps)
        quality = sum(teacher_scores[k] for k in keys[:routed]) + sum(student_scores[k] for k in keys[routed:])
        threshold = student_conf.get(keys[routed - 1]) if routed else None
        points.append({"routed": routed / len(keys) if keys else 0.0, "quality": quality / len(keys) if keys else 0.0,
                       "threshold": threshold})
    return points


def speculative(student: ModelRun, teacher: ModelRun, items: list[GoldenItem], max_new_tokens: int,
                prompts: int = 4) -> dict[str, Any]:
    """Greedy assisted generation (transformers) with the student as draft for the teacher.

    Acceptance rate: share of the teacher's greedy tokens the student predicts greedily from the same
    prefix (what a greedy draft gets accepted). Speed-up: teacher alone ÷ teacher with the draft.
    """
    import torch
    from transformers import GenerationConfig

    chosen = items[:prompts]
    if not chosen:
        return {}
    alone = assisted = 0.0
    agree = seen = 0
    with torch.inference_mode():
        for item in chosen:
            prompt = encode_chat(teacher.tokenizer, teacher.config.with_context(item.messages))
            ids = torch.tensor([prompt], device=teacher.model.device)
            settings = {"generation_config": GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=teacher.tokenizer.pad_token_id,
                eos_token_id=teacher.model.generation_config.eos_token_id)}
            start = time.perf_counter()
            plain = teacher.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
            alone += time.perf_counter() - start
            start = time.perf_counter()
            teacher.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   assistant_model=student.model, **settings)
            assisted += time.perf_counter() - start
            answer = plain[0, len(prompt):]
            if answer.numel() == 0:
                continue
            full = plain[:, : len(prompt) + answer.numel()]
            draft = student.model(input_ids=full.to(student.model.device)).logits[0, len(prompt) - 1:-1].argmax(-1)
            agree += int((draft.cpu() == answer.cpu()).sum())
            seen += answer.numel()
    return {
        "prompts": len(chosen),
        "acceptance_rate": agree / seen if seen else float("nan"),
        "teacher_alone_s": round(alone, 3),
        "with_draft_s": round(assisted, 3),
        "speedup": round(alone / assisted, 3) if assisted else float("nan"),
    }
