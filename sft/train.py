"""Fine-tune a student on factory runs: TRL `SFTTrainer` + a peft LoRA (or QLoRA) adapter.

The output directory holds, when training ends:
    checkpoints/   Trainer checkpoints (what `--resume` continues from)
    adapter/       the LoRA adapter and the tokenizer
    merged/        base + adapter merged (safetensors) with the tokenizer and its chat template
    lineage.json   data runs with their fingerprints, the sft section, base model, versions, git commit
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
from datetime import datetime, timezone
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from factory.recipe import RecipeError

from .config import SFTConfig
from .data import load_splits

PACKAGES = ("apprentice", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


@dataclass
class Hardware:
    """Settings that follow from the machine, chosen once and printed."""

    device: str
    use_cpu: bool
    bf16: bool
    fp16: bool
    dtype: str


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    merged_dir: Path
    lineage_path: Path
    train_samples: int
    eval_samples: int
    global_step: int
    metrics: dict[str, float]


def detect_hardware(config: SFTConfig) -> Hardware:
    import torch

    if not torch.cuda.is_available():
        if config.qlora:
            raise RecipeError(
                "sft.qlora: true needs a CUDA GPU (4-bit NF4 via bitsandbytes); no GPU was found. "
                "Set sft.qlora=false to train a plain LoRA adapter on this machine."
            )
        return Hardware(device="cpu", use_cpu=True, bf16=False, fp16=False, dtype="float32")
    if config.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RecipeError("sft.qlora: true needs bitsandbytes: pip install bitsandbytes") from None
    bf16 = torch.cuda.is_bf16_supported()
    return Hardware(device="cuda", use_cpu=False, bf16=bf16, fp16=not bf16, dtype="bfloat16" if bf16 else "float16")


def last_checkpoint(checkpoints: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(found) if checkpoints.is_dir() and (found := get_last_checkpoint(str(checkpoints))) else None


def train(config: SFTConfig, *, resume: bool = False, console: Any = None) -> TrainResult:
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    hardware = detect_hardware(config)
    output_dir = Path(config.output_dir)
    checkpoints = output_dir / "checkpoints"
    resume_from = last_checkpoint(checkpoints)
    if resume_from is not None and not resume:
        raise RecipeError(
            f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it, "
            "or choose another sft.output_dir"
        )
    if resume and resume_from is None:
        console.print(f"[yellow]--resume:[/] no checkpoint in {checkpoints}; starting from the beginning")

    train_set, eval_set, runs = load_splits(config.data, config.held_out, config.seed)
    console.print(
        f"[bold]data[/] {len(train_set)} train, {len(eval_set) if eval_set is not None else 0} held out "
        f"from {len(runs)} run(s)"
    )
    console.print(
        f"[bold]device[/] {hardware.device}: use_cpu={hardware.use_cpu} bf16={hardware.bf16} "
        f"fp16={hardware.fp16} dtype={hardware.dtype}"
        + (" (no CUDA GPU found: full precision on the CPU)" if hardware.use_cpu else "")
    )

    from factory.builtin import resolve_model

    base_path = resolve_model(config.student)
    model, tokenizer = _load_student(base_path, config, hardware)
    trainer = _build_trainer(config, hardware, model, tokenizer, train_set, eval_set, checkpoints)

    started = time.time()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if resume_from is not None and resume:
        console.print(f"[bold]resuming[/] from {resume_from}")
    outcome = trainer.train(resume_from_checkpoint=str(resume_from) if resume and resume_from else None)
    metrics = {k: float(v) for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
    if eval_set is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})

    adapter_dir, merged_dir = output_dir / "adapter", output_dir / "merged"
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    _save_merged(trainer.model, tokenizer, base_path, adapter_dir, merged_dir, config, hardware)

    lineage_path = output_dir / "lineage.json"
    lineage = {
        "base_model": {"name": config.student, "path": base_path},
        "data": [asdict(run) for run in runs],
        "splits": {"train": len(train_set), "eval": len(eval_set) if eval_set is not None else 0,
                   "held_out": config.held_out, "seed": config.seed},
        "sft": config.model_dump(mode="json"),
        "hardware": asdict(hardware),
        "resumed_from": str(resume_from) if resume and resume_from else None,
        "global_step": trainer.state.global_step,
        "metrics": metrics,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started_at": started_at,
        "seconds": round(time.time() - started, 2),
    }
    lineage_path.write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
    console.print(f"[green]done[/] adapter → {adapter_dir}, merged → {merged_dir}, lineage → {lineage_path}")
    return TrainResult(output_dir, adapter_dir, merged_dir, lineage_path, len(train_set),
                       len(eval_set) if eval_set is not None else 0, trainer.state.global_step, metrics)


def _load_student(base_path: str, config: SFTConfig, hardware: Hardware):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise RecipeError(
            f"sft.student {config.student}: the tokenizer has no chat template; use an instruct model "
            "(conversational prompt–completion data needs one)"
        )
    kwargs: dict[str, Any] = {"dtype": getattr(torch, hardware.dtype)}
    if config.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer


def _build_trainer(config, hardware, model, tokenizer, train_set, eval_set, checkpoints):
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    has_eval = eval_set is not None
    early_stop = has_eval and config.early_stopping_patience is not None
    args = TRLConfig(
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
        max_length=config.max_length,
        packing=config.packing,
        completion_only_loss=config.completion_only_loss,
        use_cpu=hardware.use_cpu,
        bf16=hardware.bf16,
        fp16=hardware.fp16,
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        modules_to_save=config.lora.modules_to_save,
        task_type="CAUSAL_LM",
    )
    columns = ["prompt", "completion"]
    callbacks = [EarlyStoppingCallback(config.early_stopping_patience)] if early_stop else []
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set.select_columns(columns),
        eval_dataset=eval_set.select_columns(columns) if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )


def _save_merged(model, tokenizer, base_path, adapter_dir, merged_dir, config, hardware) -> None:
    if config.qlora:
        # A 4-bit base cannot be merged into exactly; merge into the base loaded in half precision.
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, hardware.dtype))
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the code that trained, with `-dirty` when the tree has local changes."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None
