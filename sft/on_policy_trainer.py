"""The on-policy trainer: TRL's `DistillationTrainer` (TRL 1.16) with a teacher that may read more than the student.

train.py imports this module only for `sft.method: on_policy`: it imports trl and torch at its top.

TRL feeds the teacher the student's own input (prompt + sampled completion). Here each row may carry a
`teacher_prompt` (the prompt with the teacher's context in front, sft/on_policy.py): the teacher reads
[teacher_prompt | completion] and the student [prompt | completion]. Prompts are left-padded and completions
right-padded, so in both sequences the completion occupies the same last columns, and TRL's slice of the
hidden states ("the last C positions before the final one") lands on the same completion tokens for both:
position j of the slice predicts completion token j in each model, whatever the prompts' lengths. Rotary
positions shift with left padding, uniformly within a row, which leaves attention unchanged.

A served teacher (a vLLM server, factory/teachers/scoring.py) returns log-probabilities, not hidden states:
the loss is then the sampled-token estimate of the reverse KL (as Thinking Machines' on-policy distillation):
for each completion token y the advantage is log p_teacher(y) - log p_student(y), held constant, and the
student's loss is -advantage * log p_student(y), whose gradient is the per-token reverse KL's in expectation over
the student's own samples; `reverse_kl` is then the mean of log p_student(y) - log p_teacher(y).

Figures, per logging step: `reverse_kl` (KL(student ‖ teacher) at temperature 1, per completion token, from
the same hidden states the loss used), `completions/mean_length` (TRL's), `teacher_tokens` (tokens the
teacher read: its prompt with context and the completion) and `scored_tokens` (completion tokens scored).
"""
from __future__ import annotations

import asyncio
from typing import Any

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import pad

from factory.teachers.scoring import ServedScorer

ROWS_PER_CHUNK = 256  # completion positions projected to the vocabulary at once for the reverse-KL figure


class OnPolicyTrainer(DistillationTrainer):
    def __init__(self, *args: Any, served_teacher: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A TeacherConfig of a served teacher: its scorer lives on this trainer's own event loop.
        self.served_teacher = served_teacher
        self._loop = asyncio.new_event_loop() if served_teacher is not None else None
        self._scorer: ServedScorer | None = None
        self._served_kl: float | None = None
        # Totals over the run: what the teacher scored for training, and for the held-out divergence.
        self.scoring = {mode: {"samples": 0, "scored_tokens": 0, "teacher_tokens": 0} for mode in ("train", "eval")}
        self._teacher_inputs: tuple[Any, Any] | None = None
        self._hidden: dict[str, Any] = {}

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if "teacher_prompt" in inputs[0]:
            ids, _, _ = self._tokenize_prompts([row["teacher_prompt"] for row in inputs])
            device = output["prompt_ids"].device
            output["teacher_prompt_ids"] = pad([torch.tensor(x) for x in ids], padding_value=self._tokenizer.pad_token_id,
                                               padding_side="left").to(device)
            output["teacher_prompt_mask"] = pad([torch.ones(len(x), dtype=torch.long) for x in ids], padding_value=0,
                                                padding_side="left").to(device)
        return output

    def _compute_loss(self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any):
        if self.served_teacher is not None:
            return self._served_loss(unwrapped_student, inputs, num_items_in_batch)
        prompt_ids = inputs.get("teacher_prompt_ids", inputs["prompt_ids"])
        prompt_mask = inputs.get("teacher_prompt_mask", inputs["prompt_mask"])
        self._teacher_inputs = (torch.cat([prompt_ids, inputs["completion_ids"]], dim=1),
                                torch.cat([prompt_mask, inputs["completion_mask"]], dim=1))
        self._hidden = {}
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._teacher_inputs = None

    def _served_loss(self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any):
        """The sampled-token reverse KL against a served teacher's log-probabilities of the student's tokens."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completion_ids.size(1))
        head = unwrapped_student.get_output_embeddings()
        logprobs = torch.log_softmax(head(hidden.to(head.weight.device)).float() / self.temperature, dim=-1)
        mask = completion_mask.to(logprobs.device).bool()
        student = logprobs.gather(-1, completion_ids.to(logprobs.device).unsqueeze(-1)).squeeze(-1)
        teacher = self._served_scores(inputs).to(logprobs.device)
        advantage = (teacher - student).detach()
        count = mask.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        kl = ((student - teacher).detach() * mask).sum() / count.clamp(min=1)
        self._served_kl = float(kl)
        # Training: the surrogate whose gradient is the reverse KL's. Held out: the KL estimate itself, so that
        # eval_loss reads as a divergence (the surrogate's value means nothing on its own).
        loss = -(advantage * student * mask).sum() / denominator if unwrapped_student.training else kl
        entropy_sum = -(logprobs.exp() * logprobs).sum(-1)[mask].sum()
        return loss, entropy_sum.detach(), count

    def _served_scores(self, inputs: dict[str, Any]) -> Any:
        """[B, C]: the served teacher's log-probability of each completion token (0 past a completion's end),
        its prompt being the teacher's (context included) and the tokens the student sampled."""
        prompt_ids = inputs.get("teacher_prompt_ids", inputs["prompt_ids"]).cpu()
        prompt_mask = inputs.get("teacher_prompt_mask", inputs["prompt_mask"]).cpu().bool()
        completion_ids, completion_mask = inputs["completion_ids"].cpu(), inputs["completion_mask"].cpu().bool()
        rows = [(prompt_ids[row][prompt_mask[row]].tolist(), completion_ids[row][completion_mask[row]].tolist())
                for row in range(completion_ids.size(0))]

        async def score_all() -> list[Any]:
            if self._scorer is None:  # made on the loop it will run on (its HTTP session binds to it)
                self._scorer = ServedScorer(self.served_teacher, top_k=1)
            return await asyncio.gather(*(self._scorer.score(prompt, completion) if completion else _nothing()
                                          for prompt, completion in rows))

        assert self._loop is not None
        scores = self._loop.run_until_complete(score_all())
        table = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, score in enumerate(scores):
            if score is not None:
                values = torch.as_tensor(score.logprobs.sampled_logprobs, dtype=torch.float32)
                table[row, :len(values)] = values
        return table

    def close_served_teacher(self) -> None:
        if self._loop is not None:
            if self._scorer is not None:
                self._loop.run_until_complete(self._scorer.aclose())
            self._loop.close()
            self._loop = self._scorer = None

    def _get_last_hidden_state(self, unwrapped_model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int,
                               **kwargs: Any):
        is_teacher = self.teacher_model is not None and unwrapped_model is self.accelerator.unwrap_model(
            self.teacher_model)
        if is_teacher and self._teacher_inputs is not None:
            input_ids, attention_mask = self._teacher_inputs
        hidden = super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        self._hidden["teacher" if is_teacher else "student"] = hidden.detach()
        return hidden

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"].bool()
        teacher_mask = inputs.get("teacher_prompt_mask", inputs["prompt_mask"])
        scored, read = int(mask.sum()), int(teacher_mask.sum()) + int(mask.sum())
        totals = self.scoring[mode]
        totals["samples"] += int(mask.shape[0])
        totals["scored_tokens"] += scored
        totals["teacher_tokens"] += read
        self._metrics[mode]["teacher_tokens"].append(float(read))
        self._metrics[mode]["scored_tokens"].append(float(scored))
        if self._served_kl is not None:
            self._metrics[mode]["reverse_kl"].append(self._served_kl)
            self._served_kl = None
        elif "student" in self._hidden and "teacher" in self._hidden:
            kl = reverse_kl(self._hidden["student"], self._hidden["teacher"], mask,
                            self.accelerator.unwrap_model(model).get_output_embeddings(),
                            self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings())
            self._metrics[mode]["reverse_kl"].append(kl)
        self._hidden = {}
        return result


async def _nothing() -> None:
    return None


@torch.no_grad()
def reverse_kl(student_hidden: Any, teacher_hidden: Any, mask: Any, student_head: Any, teacher_head: Any) -> float:
    """Mean KL(student ‖ teacher) at temperature 1 over the completion tokens where `mask` is set.
    The hidden states are [B, C, H], aligned on the completion tokens (position j predicts token j)."""
    student_rows = student_hidden[mask]
    teacher_rows = teacher_hidden[mask].to(student_rows.device)
    if not len(student_rows):
        return 0.0
    total = 0.0
    for start in range(0, len(student_rows), ROWS_PER_CHUNK):
        student_lp = torch.log_softmax(student_head(student_rows[start:start + ROWS_PER_CHUNK]).float(), dim=-1)
        teacher_lp = torch.log_softmax(teacher_head(teacher_rows[start:start + ROWS_PER_CHUNK]).float(), dim=-1)
        total += float((student_lp.exp() * (student_lp - teacher_lp)).sum())
    return total / len(student_rows)


@torch.no_grad()
def completion_logprobs(model: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[Any]:
    """Per sequence, the log-probability [C, V] the model gives each completion position, computed as the
    trainer lays a batch out (prompts left-padded, completions right-padded) — what the alignment tests and the
    served-teacher comparison check against one sequence at a time."""
    pad_id = 0
    prompts = pad([torch.tensor(x) for x in prompt_ids], padding_value=pad_id, padding_side="left")
    prompt_mask = pad([torch.ones(len(x), dtype=torch.long) for x in prompt_ids], padding_value=0, padding_side="left")
    completions = pad([torch.tensor(x) for x in completion_ids], padding_value=pad_id, padding_side="right")
    completion_mask = pad([torch.ones(len(x), dtype=torch.long) for x in completion_ids], padding_value=0,
                          padding_side="right")
    input_ids = torch.cat([prompts, completions], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completions.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][:, -width:]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [logprobs[row, :len(ids)] for row, ids in enumerate(completion_ids)]


def build_on_policy_trainer(config: Any, model: Any, tokenizer: Any, teacher_model: Any, train_set: Any,
                            eval_set: Any, common: dict[str, Any], peft_config: Any,
                            callbacks: list[Any], served_teacher: Any = None) -> OnPolicyTrainer:
    """`common`: the TrainingArguments every method shares (sft/trainers.py), with sft.trainer_args.
    `served_teacher`: the TeacherConfig of a teacher behind a vLLM server (then `teacher_model` is None)."""
    settings = config.on_policy
    args = DistillationConfig(**common, beta=settings.beta, temperature=settings.temperature, top_p=settings.top_p,
                              max_completion_length=settings.max_completion_length)
    tokenizer.padding_side = "left"  # the trainer generates from left-padded prompts
    return OnPolicyTrainer(
        model=model,
        teacher_model=teacher_model,
        served_teacher=served_teacher,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
