"""The trainers `sft train` builds: TRL's SFTTrainer (`method: sft`), its distillation subclass (`kd`,
sft/distill_trainer.py) and TRL's DistillationTrainer subclass (`on_policy`, sft/on_policy_trainer.py), with the
`sft.trainer_args` check. Importing it loads torch, TRL and peft: sft/train.py imports it once a training starts,
so `sft list`, `sft lineage` and the sweep's planning stay light."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from peft import LoraConfig
from transformers import EarlyStoppingCallback, TrainerCallback
from trl import DistillationConfig, SFTTrainer
from trl import SFTConfig as TRLConfig

from apprentice.errors import RecipeError

from .config import SFTConfig
from .distill_trainer import DistillTrainer
from .kd import align
from .on_policy_trainer import build_on_policy_trainer
from .progress import clock_named


class TimeBudget(TrainerCallback):
    """`sft.max_seconds`: ends training at the first optimizer step that ends past the budget, counted from the
    start of training on the wall clock or on this process's CPU time. `stopped_at` is that step (None: the
    steps or epochs ran out first)."""

    def __init__(self, seconds: float, clock: str = "wall") -> None:
        self.seconds = seconds
        self.clock = clock_named(clock)
        self.started: float | None = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None and self.clock() - self.started >= self.seconds:
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def budget_reading(trainer, config) -> dict | None:
    """lineage.json's `budget`: the time budget and the step that spent it (None when the steps ran out first)."""
    if config.max_seconds is None:
        return None
    budget = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TimeBudget))
    return {"seconds": config.max_seconds, "clock": config.max_seconds_clock, "stopped_at_step": budget.stopped_at}


def build_trainer(config, hardware, model, tokenizer, train_set, eval_set, checkpoints, teacher=None,
                  served_teacher=None):
    has_eval = eval_set is not None
    early_stop = has_eval and config.early_stopping_patience is not None
    callbacks = [EarlyStoppingCallback(config.early_stopping_patience)] if early_stop else []
    if config.max_seconds is not None:
        callbacks.append(TimeBudget(config.max_seconds, config.max_seconds_clock))
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        modules_to_save=config.lora.modules_to_save,
        task_type="CAUSAL_LM",
    )
    peft_config = None if config.init_from is not None else lora  # init_from: the model carries its adapter
    # What every method's TrainingArguments share; sft.trainer_args last, checked against the method's config.
    common = dict(
        output_dir=str(checkpoints),
        seed=config.seed,
        data_seed=config.seed,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_every_steps,
        save_strategy="steps",
        save_steps=config.eval_every_steps,
        save_total_limit=2,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        logging_steps=config.logging_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        use_cpu=hardware.use_cpu,
        bf16=hardware.bf16,
        fp16=hardware.fp16,
        report_to=config.report_to,
        disable_tqdm=True,
    )
    if config.method == "on_policy":
        return build_on_policy_trainer(config, model, tokenizer, teacher, train_set, eval_set,
                                       {**common, **trainer_args(config, DistillationConfig)}, peft_config, callbacks,
                                       served_teacher)
    args = TRLConfig(**common, max_length=config.max_length, packing=config.packing,
                     completion_only_loss=config.completion_only_loss, **trainer_args(config, TRLConfig))
    columns = ["prompt", "completion"]
    trainer_class, extra = SFTTrainer, {}
    if teacher is not None:
        trainer_class, extra = DistillTrainer, {"distill": config.distill, "teacher": teacher}
    return trainer_class(
        model=model,
        args=args,
        # The record id travels with a distillation sample: it is the sidecar's key.
        train_dataset=train_set.select_columns(columns + (["id"] if teacher is not None else [])),
        eval_dataset=eval_set.select_columns(columns) if has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        **extra,
    )


# ---- distillation -------------------------------------------------------------------------------------------
# TRL SFTConfig fields the sft: section sets itself, and the sft key that owns each where there is one.
OWNED = {"output_dir": "sft.output_dir", "seed": "sft.seed", "data_seed": "sft.seed",
         "learning_rate": "sft.learning_rate", "num_train_epochs": "sft.epochs", "max_steps": "sft.max_steps",
         "lr_scheduler_type": "sft.lr_scheduler", "warmup_steps": "sft.warmup_ratio",
         "per_device_train_batch_size": "sft.per_device_batch_size",
         "per_device_eval_batch_size": "sft.per_device_batch_size",
         "gradient_accumulation_steps": "sft.gradient_accumulation_steps", "eval_steps": "sft.eval_every_steps",
         "save_steps": "sft.eval_every_steps", "logging_steps": "sft.logging_steps",
         "gradient_checkpointing": "sft.gradient_checkpointing", "max_length": "sft.max_length",
         "packing": "sft.packing", "completion_only_loss": "sft.completion_only_loss", "report_to": "sft.report_to",
         "eval_strategy": None, "save_strategy": None, "save_total_limit": None, "load_best_model_at_end": None,
         "metric_for_best_model": None, "use_cpu": None, "bf16": None, "fp16": None, "disable_tqdm": None}


# DistillationConfig fields that `sft.on_policy` sets (method: on_policy).
ON_POLICY_OWNED = {"beta": "sft.on_policy.beta", "temperature": "sft.on_policy.temperature",
                   "top_p": "sft.on_policy.top_p", "max_completion_length": "sft.on_policy.max_completion_length"}


def trainer_args(config: SFTConfig, trl_config: type) -> dict[str, Any]:
    """`sft.trainer_args`, checked against TRL's SFTConfig fields: an unknown key is named with the closest
    known one, and a field this section sets is named with the sft key to set instead."""
    known = {field.name for field in dataclasses.fields(trl_config)}
    owned = {**OWNED, **(ON_POLICY_OWNED if trl_config is DistillationConfig else {})}
    problems = []
    for key in config.trainer_args:
        if key in owned:
            owner = owned[key]
            problems.append(f"sft.trainer_args.{key}: set by Apprentice" + (f"; set {owner} instead" if owner
                                                                          else " from the hardware and the recipe"))
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            problems.append(f"sft.trainer_args.{key}: not a field of TRL's SFTConfig"
                            + (f"; did you mean `{close[0]}`?" if close else ""))
    if problems:
        raise RecipeError("\n".join(problems))
    return dict(config.trainer_args)


def align_with_teacher(trainer: Any, teacher: Any) -> dict[str, Any]:
    """Give each prepared training example `kd_len`: how many of its completion tokens take the teacher's
    distribution (sft/kd.py `align`; 0 = plain CE). Streams the dataset in batches: memory stays flat."""
    dataset = trainer.train_dataset
    lengths: list[int] = []
    counts = {"samples": 0, "aligned": 0, "fallback": 0, "mismatched": 0, "missing": 0, "kd_tokens": 0}
    for batch in dataset.select_columns(["id", "labels"]).iter(batch_size=512):
        for record_id, labels in zip(batch["id"], batch["labels"]):
            completion = [token for token in labels if token != -100]
            found = teacher.get(record_id)
            n = align(completion, found.sampled_ids.tolist()) if found is not None else 0
            counts["samples"] += 1
            if found is None:
                counts["missing"] += 1
            elif n == 0:
                counts["mismatched"] += 1
            counts["aligned" if n else "fallback"] += 1
            counts["kd_tokens"] += n
            lengths.append(n)
    trainer.train_dataset = dataset.add_column("kd_len", lengths)
    return {**counts, "teacher_tokenizer": teacher.fingerprint, "top_k": teacher.k}
