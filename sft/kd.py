"""The distillation loss: α·T²·KL(teacher_topk ‖ student) + (1−α)·CE, over completion tokens only.

Per completion token t (label ≠ -100; prompt and padding are masked out):

    loss_t = α·T²·KL_t + (1−α)·CE_t    where the teacher's distribution for t is known
    loss_t = CE_t                       where it is not (a sample whose tokens did not align, see sft/train.py)
    loss   = Σ_t loss_t / N             N = completion tokens (or the trainer's num_items_in_batch)

so α = 0 is exactly the plain SFT loss, and a sample without teacher logprobs trains as in plain SFT.

CE_t is the usual cross-entropy of the label at temperature 1 over the full vocabulary.

The teacher. The sidecar stores, per token, the top-k ids with their log-probabilities at temperature 1
(log p_i, normalised over the teacher's full vocabulary, so Σ_k p_i ≤ 1). At temperature T we take
p_i^(1/T) renormalised over those k ids: softmax(log p_i / T) over the k. Dividing log p_i by T and
renormalising equals the teacher's temperature-T distribution restricted to its top-k and renormalised,
because log p_i = z_i − log Z and the −log Z/T shift cancels. The mass outside the top-k is unknown, so
it is dropped rather than guessed; k = 20 holds nearly all of it for a sharp teacher.

The student. Its log-probabilities at temperature T are taken over its *full* vocabulary, then gathered
at the teacher's k ids: log q_i = z_i/T − logsumexp(z/T). We do not renormalise them over the k:

    KL_t = Σ_{i∈topk} p̃_i (log p̃_i − log q_i)
         = KL(p̃ ‖ q̃) − log Σ_{i∈topk} q_i       (q̃: the student renormalised over the k)

The second term is ≥ 0 and vanishes only when the student puts all its mass on the teacher's top-k, so
the full-vocabulary form also pushes down what the teacher considers unlikely; renormalising the student
too would leave that mass free. KL_t ≥ 0 either way, and it is 0 exactly when q equals p̃ on the k ids.

T² keeps the gradient of the KL term on the scale of the CE term as T grows (Hinton et al., 2015).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from apprentice.errors import RecipeError
from factory.logprobs import LogprobsError, LogprobsIndex, read_meta, tokenizer_fingerprint


class DistillLoss(NamedTuple):
    loss: Any        # scalar tensor with gradient: what the trainer backpropagates
    ce: float        # mean CE over the completion tokens (for logging)
    kd: float        # mean T²·KL over the tokens with a teacher distribution (for logging; 0 when none)
    kd_tokens: int   # tokens with a teacher distribution
    tokens: int      # completion tokens


def distill_loss(
    logits: Any,
    labels: Any,
    teacher_ids: Any,
    teacher_logprobs: Any,
    teacher_mask: Any,
    *,
    alpha: float,
    temperature: float,
    num_items: Any = None,
) -> DistillLoss:
    """The loss of one batch. Shapes, all aligned on the token positions of the sequence:

    logits [B, S, V]            position s predicts the token at s+1 (a causal LM's logits)
    labels [B, S]               token ids; -100 on prompt and padding
    teacher_ids [B, S, k]       the teacher's top-k ids for the token *at* s; -1 pads missing entries
    teacher_logprobs [B, S, k]  their log-probabilities at temperature 1; -inf pads missing entries
    teacher_mask [B, S]         True where the token at s has a teacher distribution
    num_items                   the normaliser N (the trainer's token count across gradient accumulation);
                                default: the completion tokens of this batch
    """
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Predictions at s score the token at s+1.
    labels = labels[:, 1:]
    valid = labels != -100
    logits = logits[:, :-1][valid].float()                      # [N, V]: completion positions only
    targets = labels[valid]                                     # [N]
    ids = teacher_ids[:, 1:][valid].long()                      # [N, k]
    teacher_lp = teacher_logprobs[:, 1:][valid].float()         # [N, k]
    entry_ok = (ids >= 0) & torch.isfinite(teacher_lp)
    has_teacher = teacher_mask[:, 1:][valid].bool() & entry_ok.any(dim=-1)  # [N]

    ce = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)

    scaled = logits / temperature
    student_lp = scaled.gather(-1, ids.clamp(min=0)) - torch.logsumexp(scaled, dim=-1, keepdim=True)
    teacher_scaled = torch.where(entry_ok, teacher_lp / temperature, torch.full_like(teacher_lp, -torch.inf))
    # Rows without any teacher entry would be softmax(-inf…) = NaN; they are masked out below.
    teacher_scaled = torch.where(has_teacher[:, None], teacher_scaled, torch.zeros_like(teacher_scaled))
    p = torch.softmax(teacher_scaled, dim=-1)
    # -inf padding entries have p = 0; a finite stand-in keeps 0·(−inf) = NaN out of the sum and its gradient.
    log_p = torch.where(entry_ok, torch.log_softmax(teacher_scaled, dim=-1), torch.zeros_like(p))
    terms = torch.where(entry_ok, p * (log_p - student_lp), torch.zeros_like(p))
    kl = (temperature ** 2) * terms.sum(dim=-1)                # [N]

    weight = alpha * has_teacher.to(ce.dtype)
    per_token = (1.0 - weight) * ce + weight * torch.where(has_teacher, kl, torch.zeros_like(kl))
    count = int(valid.sum())
    normaliser = torch.as_tensor(num_items if num_items is not None else count, device=per_token.device)
    loss = per_token.sum() / normaliser.clamp(min=1)
    kd_tokens = int(has_teacher.sum())
    return DistillLoss(
        loss=loss,
        ce=float(ce.detach().mean()) if count else 0.0,
        kd=float(kl.detach()[has_teacher].mean()) if kd_tokens else 0.0,
        kd_tokens=kd_tokens,
        tokens=count,
    )


# ---- the teacher's side: sidecars of the data runs, alignment with the student's tokens ----------------------
class TeacherLogprobs:
    """The logprobs sidecars of every data run, looked up by record id, with the checks that make them usable.

    Refuses, naming the run and the fix: a run without a sidecar, a sidecar of token strings (no ids), a
    sidecar without a tokenizer fingerprint, and runs whose teachers used different tokenizers.
    """

    def __init__(self, run_dirs: list[Any]) -> None:
        self.indexes = []
        self.fingerprint: dict[str, Any] | None = None
        self.source = None
        for run_dir in map(Path, run_dirs):
            meta = read_meta(run_dir)
            if meta is None:
                raise RecipeError(
                    f"sft.distill needs the teacher's logprobs and {run_dir} has none ({run_dir / 'logprobs'} is "
                    "missing): generate the run with factory.teacher.logprobs: {top_k: 20} (into a new output_dir), "
                    "or remove sft.distill to train on the teacher's text alone"
                )
            if meta.get("token_kind") != "ids":
                raise RecipeError(
                    f"{run_dir}: the teacher's logprobs are token strings without ids ({meta.get('note', '')}); "
                    "distillation compares ids with the student's. Remove sft.distill for this run"
                )
            fingerprint = meta.get("tokenizer") or {}
            if not fingerprint.get("vocab_sha256"):
                raise RecipeError(
                    f"{run_dir}: the teacher's logprobs carry no tokenizer fingerprint; regenerate with "
                    "factory.teacher.logprobs.tokenizer set to the served model's tokenizer"
                )
            if self.fingerprint is not None and fingerprint["vocab_sha256"] != self.fingerprint["vocab_sha256"]:
                raise RecipeError(
                    f"sft.data mixes teachers with different tokenizers: {describe(self.fingerprint)} and "
                    f"{describe(fingerprint)} ({run_dir}); distil from runs of one tokenizer at a time"
                )
            self.fingerprint = fingerprint
            try:
                self.indexes.append(LogprobsIndex(run_dir))
            except LogprobsError as exc:
                raise RecipeError(str(exc)) from None
        self.k = max(index.k for index in self.indexes)

    def get(self, record_id: str) -> Any:
        for index in self.indexes:
            found = index.get(record_id)
            if found is not None:
                return found
        return None

    def check_student(self, tokenizer: Any, student: str) -> None:
        """Refuse a student whose vocabulary differs from the teacher's: the ids would mean other tokens."""
        mine = tokenizer_fingerprint(tokenizer, student)
        assert self.fingerprint is not None
        if mine["vocab_sha256"] != self.fingerprint["vocab_sha256"]:
            raise RecipeError(
                f"sft.distill: the student's tokenizer is not the teacher's, so the teacher's token ids mean "
                f"other tokens to it. Student: {describe(mine)}; teacher: {describe(self.fingerprint)}. "
                "Use a student with the teacher's tokenizer (the same model family), or remove sft.distill to "
                "train on the teacher's text alone"
            )


def describe(fingerprint: dict[str, Any]) -> str:
    return (f"{fingerprint.get('name')} (vocab_sha256 {str(fingerprint.get('vocab_sha256'))[:16]}…, "
            f"{fingerprint.get('vocab_size')} tokens)")


def align(student_ids: list[int], teacher_ids: list[int]) -> int:
    """How many leading completion tokens get the teacher's distribution; 0 means plain CE for the sample.

    The teacher's distribution at token j was computed after the teacher's own tokens 0..j-1, so it is a
    target for the student only where the student's tokens are those same tokens. We require the
    student's completion tokens to equal the teacher's sampled ids, except:
      - where one is cut short: `max_length` truncated the student's, or the chat template adds tokens
        after the end of turn (SmolLM2 writes "<|im_end|>\\n"; the teacher stopped at <|im_end|>);
      - the teacher's last token alone differs: it stopped on another end token than the template's
        (<|endoftext|> vs <|im_end|>), or its answer was cut mid-character and the re-encoded text ends
        differently. The tokens before it still align.
    Anything else (a re-tokenization that merges or splits tokens, a chat template that rewrites the
    text) falls back to CE and is counted by the caller.
    """
    n = min(len(student_ids), len(teacher_ids))
    if n == 0:
        return 0
    if student_ids[:n] == teacher_ids[:n]:
        return n
    if n == len(teacher_ids) and n > 1 and student_ids[: n - 1] == teacher_ids[: n - 1]:
        return n - 1
    return 0
