"""The `sft:` section of a recipe: pydantic models and loading.

Config layer: it imports no behaviour module. Every problem is reported at once with its `sft.` key path,
through the one recipe loader (apprentice/config.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from apprentice.config import Strict, load_section, validate_section
from factory.recipe import TeacherConfig

from .sweep_config import SweepSettings


class LoraSettings(Strict):
    r: int = Field(default=16, ge=1, description="LoRA rank")
    alpha: int = Field(default=32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        default="all-linear", description="'all-linear' or module names such as [q_proj, v_proj]"
    )
    modules_to_save: list[str] | None = Field(
        default=None, description="modules trained in full and saved with the adapter, e.g. [lm_head]"
    )


class DistillSettings(Strict):
    """Distillation from the teacher's top-k logprobs (the runs' `logprobs/` sidecars); see sft/kd.py."""

    alpha: float = Field(default=0.8, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the CE")
    temperature: float = Field(default=2.0, gt=0, description="softens teacher and student; the KL is scaled by T²")


class OnPolicySettings(Strict):
    """On-policy distillation (sft/on_policy.py): the student samples, the teacher scores every token of the
    sample, the student minimises the divergence. TRL's DistillationTrainer (TRL 1.16) underneath."""

    teacher: TeacherConfig | None = Field(
        default=None, description="the teacher, as factory.teacher names one (provider local or vllm: loaded in this "
        "process with transformers); default: the teacher of the first sft.data run (its manifest.json)")
    use_context: bool = Field(
        default=True, description="the teacher scores with its teacher.context in front of the prompt while the "
        "student sees the bare prompt (on-policy context distillation)")
    beta: float = Field(default=1.0, ge=0, le=1, description="1 = reverse KL, 0 = forward KL, between: generalised JSD")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature, and the divergence's")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling of the student's completions")
    max_completion_length: int = Field(default=64, ge=1, description="tokens the student samples per prompt at most")
    num_generations: int = Field(
        default=1, ge=1, description="samples per prompt per epoch (each prompt is repeated; TRL samples one "
        "completion per row)")


class SFTConfig(Strict):
    student: str = Field(
        default="meta-llama/Llama-3.2-3B-Instruct",
        description="HF id, local folder, or builtin:smollm2-135m-instruct",
    )
    data: list[Path] = Field(min_length=1, description="factory run directories, each with accepted.jsonl")
    held_out: float = Field(
        default=0.1, ge=0, lt=1, description="fraction of prompts whose samples are kept for evaluation"
    )
    stratify_by: str | None = Field(
        default=None, description="an attribute name: each of its values gets its share of held-out prompts"
    )
    seed: int = 0
    output_dir: Path = Path("runs/sft-demo")
    max_length: int = Field(default=1024, ge=8, description="tokens per example; longer ones are truncated")
    packing: bool = False
    completion_only_loss: bool = Field(default=True, description="loss on the completion tokens only")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: bool = Field(default=False, description="load the base in 4-bit NF4 (bitsandbytes, CUDA GPU only)")
    learning_rate: float = Field(default=2e-5, gt=0)
    epochs: float = Field(default=3, gt=0)
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    per_device_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    eval_every_steps: int = Field(default=50, ge=1, description="evaluate and checkpoint every N steps")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="stop after N evaluations without improvement; null = off"
    )
    gradient_checkpointing: bool = Field(
        default=True, description="recompute activations in backward: less memory, about a third slower"
    )
    max_steps: int | None = Field(default=None, ge=1, description="stop after N optimizer steps (smoke runs)")
    max_seconds: float | None = Field(
        default=None, gt=0, description="a time budget: stop at the end of the first optimizer step that ends "
        "N seconds or more after training began (model loading not counted); methods compared at equal time. "
        "The learning-rate schedule still spans max_steps or the epochs: with a budget, use lr_scheduler constant "
        "or set max_steps near what the budget allows")
    max_seconds_clock: Literal["wall", "cpu"] = Field(
        default="wall", description="the clock of sft.max_seconds: wall, or cpu (this process's CPU time, all "
        "threads: a budget that a shared, loaded machine does not shrink)")
    report_to: str | list[str] = Field(
        default="none", description="where the trainer logs its figures, as transformers names them: none, "
        "tensorboard, wandb, mlflow, trackio, ... (the tracker's package must be installed)")
    trainer_args: dict[str, Any] = Field(
        default_factory=dict, description="any other field of TRL's SFTConfig (optim, weight_decay, "
        "max_grad_norm, attn_implementation, ...), passed as it is; checked against SFTConfig's fields")
    logging_steps: int = Field(default=10, ge=1)
    method: Literal["sft", "kd", "on_policy"] | None = Field(
        default=None, description="sft: the teacher's text; kd: plus its top-k logprobs (sft.distill); on_policy: "
        "the student's own samples scored by the teacher (sft.on_policy). Default: kd when sft.distill is set, "
        "else sft")
    on_policy: OnPolicySettings | None = Field(
        default=None, description="{beta: 1.0, temperature: 1.0, max_completion_length: 64}: settings of "
        "method: on_policy")
    init_from: Path | None = Field(
        default=None, description="a trained student (its output_dir, or its adapter/ folder) whose LoRA adapter "
        "training starts from, e.g. runs/sft-demo; default: a fresh adapter on sft.student")
    distill: DistillSettings | None = Field(
        default=None, description="{alpha: 0.8, temperature: 2.0}: add a KL term towards the teacher's logprobs"
    )
    sweep: SweepSettings | None = Field(default=None, description="what `sft sweep` tries (sft/sweep_config.py)")

    @model_validator(mode="after")
    def _one_method(self) -> "SFTConfig":
        if self.method is None:
            self.method = "kd" if self.distill is not None else "on_policy" if self.on_policy is not None else "sft"
        if self.method == "kd" and self.distill is None:
            self.distill = DistillSettings()
        if self.method != "kd" and self.distill is not None:
            raise ValueError(f"method: {self.method} with distill set: distill is the kd method's; remove "
                             "sft.distill, or set method: kd")
        if self.method == "on_policy" and self.on_policy is None:
            self.on_policy = OnPolicySettings()
        if self.method != "on_policy" and self.on_policy is not None:
            raise ValueError(f"method: {self.method} with on_policy set: remove sft.on_policy, or set method: on_policy")
        if self.method == "on_policy" and self.qlora:
            raise ValueError("method: on_policy trains a plain LoRA adapter here: set qlora: false")
        return self

    @model_validator(mode="after")
    def _distill_needs_completions(self) -> "SFTConfig":
        if self.distill is not None and (self.packing or not self.completion_only_loss):
            raise ValueError("distill needs packing: false and completion_only_loss: true (the teacher's logprobs "
                             "are aligned with each sample's completion tokens)")
        return self


def validate_sft_section(section: object, path: Path | str = "<recipe>") -> SFTConfig:
    return validate_section(SFTConfig, "sft", section, path)


def load_sft_config(path: Path | str, overrides: list[str] | None = None) -> SFTConfig:
    """The validated `sft:` section of a recipe file, after `--set sft.key=value` overrides."""
    return load_section(SFTConfig, "sft", path, overrides)
