"""The distillation trainer: TRL's `SFTTrainer` with the loss of sft/kd.py towards the teacher's top-k logprobs.

train.py imports this module only when the recipe has `sft.distill`: it imports trl (and with it torch)
at its top, as TRL's own trainer modules do.

The held-out loss stays plain cross-entropy (`compute_loss` falls back to SFTTrainer's outside training),
so that runs with and without distillation, and at different temperatures, are compared on one number.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from trl import SFTTrainer

from .kd import distill_loss

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_mask")


class TeacherCollator:
    """TRL's collator, plus the teacher's top-k ids and logprobs laid on each example's completion tokens.

    `teacher_*[b, s]` is the teacher's distribution for the token at position s (see sft/kd.py). Examples
    without `kd_len` (the held-out set) are collated as TRL does, with no teacher tensors.
    """

    def __init__(self, base: Any, teacher: Any) -> None:
        self.base = base
        self.teacher = teacher

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [(example.get("id"), int(example.get("kd_len") or 0)) for example in examples]
        batch = self.base([{k: v for k, v in e.items() if k not in ("id", "kd_len")} for e in examples])
        if "kd_len" not in examples[0]:
            return batch
        labels = batch["labels"]
        size, length = labels.shape
        k = self.teacher.k
        ids = torch.full((size, length, k), -1, dtype=torch.long)
        logprobs = torch.full((size, length, k), -torch.inf, dtype=torch.float32)
        mask = torch.zeros((size, length), dtype=torch.bool)
        for row, (record_id, n) in enumerate(keys):
            if n <= 0:
                continue
            found = self.teacher.get(record_id)
            start = int((labels[row] != -100).nonzero()[0])
            width = found.top_ids.shape[1]
            ids[row, start:start + n, :width] = torch.from_numpy(found.top_ids[:n].astype("int64"))
            logprobs[row, start:start + n, :width] = torch.from_numpy(found.top_logprobs[:n].copy())
            mask[row, start:start + n] = True
        batch.update(teacher_ids=ids, teacher_logprobs=logprobs, teacher_mask=mask)
        return batch


class DistillTrainer(SFTTrainer):
    """SFTTrainer whose training loss is sft/kd.py's α·T²·KL + (1−α)·CE on examples that carry `kd_len`."""

    def __init__(self, *args: Any, distill: Any, teacher: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.data_collator = TeacherCollator(self.data_collator, teacher)
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(type(inner).forward).parameters

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + ["id", "kd_len"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = {key: inputs.pop(key) for key in TEACHER_KEYS if key in inputs}
        if not teacher or not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        model_inputs["use_cache"] = False
        offset = 0
        if self._logits_to_keep:
            # Logits only from the last prompt token on: the prompt's logits would be masked anyway.
            completion = (labels != -100).any(dim=0).nonzero()
            first = int(completion[0]) if len(completion) else labels.shape[1] - 1
            offset = max(0, first - 1)
            model_inputs["logits_to_keep"] = labels.shape[1] - offset
        logits = model(**model_inputs).logits
        result = distill_loss(
            logits, labels[:, offset:], teacher["teacher_ids"][:, offset:],
            teacher["teacher_logprobs"][:, offset:], teacher["teacher_mask"][:, offset:],
            alpha=self.distill.alpha, temperature=self.distill.temperature, num_items=num_items_in_batch,
        )
        loss = result.loss
        # As SFTTrainer: num_items_in_batch counts every rank's tokens and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        metrics = self._metrics["train"]
        metrics["ce_loss"].append(result.ce)
        if result.kd_tokens:
            metrics["kd_loss"].append(result.kd)
        if "attention_mask" in inputs:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss
