"""Fine-tune a student on factory runs: TRL `SFTTrainer` + a peft LoRA (or QLoRA) adapter.

The output directory holds, when training ends:
    checkpoints/     Trainer checkpoints (what `--resume` continues from)
    adapter/         the LoRA adapter and the tokenizer
    merged/          base + adapter merged (safetensors) with the tokenizer and its chat template
    loss_curves.png  train and held-out loss against the step
    lineage.json     data runs with their fingerprints, the sft section, base model, versions, git commit

With `sft.distill`, a `SFTTrainer` subclass (sft/distill_trainer.py) adds the KL term of sft/kd.py towards
the teacher's top-k logprobs (the runs' `logprobs/` sidecars), sample by sample where the student's
completion tokens are the teacher's sampled tokens. The held-out loss stays plain cross-entropy, so that runs with and without
distillation, and at different temperatures, are compared on the same number.

Under `accelerate launch` (DDP, FSDP) every process runs this; files are written by the main process.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

from apprentice.errors import RecipeError
from factory.builtin import resolve_model
from factory.lock import DirectoryLock

from .card import write_cards
from .config import SFTConfig
from .data import load_splits
from .kd import TeacherLogprobs
from .lineage import latest_eval, run_content, weights_content
from .on_policy import figures, is_served, load_teacher, prompt_splits, resolve_teacher, start_from
from .progress import RichProgress

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
    merged_dir: Path | None
    lineage_path: Path
    train_samples: int
    eval_samples: int
    global_step: int
    metrics: dict[str, float]
    distill: dict[str, Any] | None = None
    on_policy: dict[str, Any] | None = None


def detect_hardware(config: SFTConfig) -> Hardware:
    import torch

    if config.qlora:
        _require_bitsandbytes(cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        if not config.qlora and torch.backends.mps.is_available():
            # A Mac's GPU: the Trainer moves the model there when use_cpu is off; full precision, as MPS's
            # half-precision training support is partial. QLoRA stays on the CPU (bitsandbytes has no MPS).
            return Hardware(device="mps", use_cpu=False, bf16=False, fp16=False, dtype="float32")
        return Hardware(device="cpu", use_cpu=True, bf16=False, fp16=False, dtype="float32")
    bf16 = torch.cuda.is_bf16_supported()
    return Hardware(device="cuda", use_cpu=False, bf16=bf16, fp16=not bf16, dtype="bfloat16" if bf16 else "float16")


def _require_bitsandbytes(cpu: bool) -> None:
    """QLoRA loads the base in 4-bit NF4 through bitsandbytes; its CPU backend (0.46 and newer) runs it
    too, slowly: good for smoke runs and tests, a GPU for real ones."""
    import importlib.metadata

    fix = "pip install 'apprentice[qlora]' (bitsandbytes), or set sft.qlora=false to train a plain LoRA adapter"
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(f"sft.qlora: true needs bitsandbytes, which is not installed: {fix}") from None
    major, minor = (int(part) for part in version.split(".")[:2])
    if cpu and (major, minor) < (0, 46):
        raise RecipeError(
            f"sft.qlora: true on a machine without a CUDA GPU needs bitsandbytes 0.46 or newer (its CPU "
            f"backend); {version} is installed: pip install -U bitsandbytes, or set sft.qlora=false"
        )


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint. The Trainer writes trainer_state.json last: a folder without it was
    cut off mid-save (a kill -9, seen in the sweep's resume test) and resuming from it would fail."""
    if not checkpoints.is_dir():
        return None
    complete = [path for path in checkpoints.glob("checkpoint-*")
                if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()]
    return max(complete, key=lambda path: int(path.name.removeprefix("checkpoint-")), default=None)


def output_lock(directory: Path | str, key: str) -> contextlib.AbstractContextManager:
    """The output directory's lock, held by the main process of a launch (accelerate/torchrun start one
    process per GPU, all writing through the main one), so that a second `sft train` on it is refused."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return DirectoryLock(Path(directory), key)


def train(config: SFTConfig, *, resume: bool = False, console: Any = None, fraction: float = 1.0,
          export_merged: bool = True, callbacks: list[Any] = ()) -> TrainResult:
    """Train, evaluate, save, holding the output directory's lock. `fraction` keeps that share of the
    training split (seeded; the held-out split is unchanged), `export_merged=False` skips the merged model,
    `callbacks` join the Trainer's (a sweep's pruner): all three for sweeps of short runs."""
    with output_lock(config.output_dir, "sft.output_dir"):
        return _train(config, resume=resume, console=console, fraction=fraction, export_merged=export_merged,
                      callbacks=callbacks)


def _train(config: SFTConfig, *, resume: bool = False, console: Any = None, fraction: float = 1.0,
          export_merged: bool = True, callbacks: list[Any] = ()) -> TrainResult:
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
        console.print(f"[yellow]--resume:[/] no checkpoint in {escape(str(checkpoints))}; starting from the beginning",
                      highlight=False)

    # Imported once a training starts: it loads torch, TRL and peft (and our two trainer subclasses).
    from .trainers import DistillationConfig, TRLConfig, align_with_teacher, budget_reading, build_trainer, trainer_args

    on_policy = config.method == "on_policy"
    trainer_args(config, DistillationConfig if on_policy else TRLConfig)  # misspelt keys stop before any model loads
    train_set, eval_set, runs = load_splits(config.data, config.held_out, config.seed, config.stratify_by)
    contents = [run_content(run.path) for run in runs]  # as read now: `sft lineage --verify` compares with it
    teacher_config = resolve_teacher(config) if on_policy else None
    if teacher_config is not None:  # the student's own samples of the runs' prompts, held-out prompts kept out
        held = set(eval_set["group"]) if eval_set is not None else set()
        train_set, eval_set = prompt_splits(config, teacher_config, held)
    if fraction < 1.0:
        keep = max(1, round(len(train_set) * fraction))
        train_set = train_set.shuffle(seed=config.seed).select(range(keep))
    teacher = None
    if config.distill is not None:
        teacher = TeacherLogprobs(config.data)  # refuses runs without usable logprobs, before any model loads
    console.print(
        f"[bold]data[/] {len(train_set)} train, {len(eval_set) if eval_set is not None else 0} held out "
        f"from {len(runs)} run(s)"
    )
    console.print(
        f"[bold]device[/] {hardware.device}: use_cpu={hardware.use_cpu} bf16={hardware.bf16} "
        f"fp16={hardware.fp16} dtype={hardware.dtype}"
        + (" (no CUDA GPU found: full precision on the CPU)" if hardware.use_cpu else "")
        + (" — QLoRA: 4-bit NF4 base via bitsandbytes" + (" on the CPU (slow: for smoke runs)" if hardware.use_cpu else "")
           if config.qlora else "")
    )

    base_path = resolve_model(config.student)
    model, tokenizer = _load_student(base_path, config, hardware)
    if config.init_from is not None:
        model = start_from(model, config)
    if teacher is not None:
        teacher.check_student(tokenizer, config.student)
    if teacher_config is not None:
        teacher_model, teacher_path = load_teacher(teacher_config, tokenizer, config, hardware.dtype, console)
    served = teacher_config is not None and is_served(teacher_config)  # scored over HTTP: no weights here
    trainer = build_trainer(config, hardware, model, tokenizer, train_set, eval_set, checkpoints,
                            teacher_model if teacher_config is not None else teacher,
                            served_teacher=teacher_config if served else None)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints each log dict raw; the progress line says the same
    trainer.add_callback(RichProgress(console, config.max_seconds, config.max_seconds_clock))
    for callback in callbacks:  # after the progress bar: a pruner ending the run at on_train_end stops it first
        trainer.add_callback(callback)
    distill_info = None
    if teacher is not None:
        distill_info = align_with_teacher(trainer, teacher)
        console.print(
            f"[bold]distill[/] alpha={config.distill.alpha} T={config.distill.temperature} k={teacher.k}: "
            f"{distill_info['aligned']} of {distill_info['samples']} training samples aligned with the teacher's "
            f"tokens; {distill_info['fallback']} fall back to cross-entropy "
            f"({distill_info['mismatched']} tokenized differently, {distill_info['missing']} without logprobs)"
        )

    started = time.time()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if resume_from is not None and resume:
        console.print(f"[bold]resuming[/] from {escape(str(resume_from))}", highlight=False)
    wall_start, cpu_start = time.monotonic(), time.process_time()
    try:
        outcome = trainer.train(resume_from_checkpoint=str(resume_from) if resume and resume_from else None)
        train_seconds, train_cpu_seconds = time.monotonic() - wall_start, time.process_time() - cpu_start
        metrics = {k: float(v) for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
        # Tokens trained on (prompt and completion, padding excluded), as SFTTrainer counts them in its logs.
        history = trainer.state.log_history
        tokens = next((entry["num_tokens"] for entry in reversed(history) if "num_tokens" in entry), None)
        if tokens is not None:
            metrics["train_tokens"] = float(tokens)
        on_policy_info = figures(trainer, teacher_config, teacher_path, config) if teacher_config is not None else None
        if eval_set is not None:
            metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    finally:
        if served:  # its HTTP session and event loop, on an error too
            trainer.close_served_teacher()

    adapter_dir, merged_dir = output_dir / "adapter", output_dir / "merged"
    trainer.save_model(str(adapter_dir))  # every process: under FSDP the adapter is gathered from the shards
    lineage_path = output_dir / "lineage.json"
    if not trainer.is_world_process_zero():
        return TrainResult(output_dir, adapter_dir, merged_dir if export_merged else None, lineage_path,
                           len(train_set), len(eval_set) if eval_set is not None else 0, trainer.state.global_step,
                           metrics, distill_info, on_policy_info)
    tokenizer.save_pretrained(adapter_dir)
    if export_merged:
        distributed = trainer.accelerator.num_processes > 1
        _save_merged(trainer.model, tokenizer, base_path, adapter_dir, merged_dir, config, hardware, distributed)
    curves = plot_loss_curves(trainer.state.log_history, output_dir / "loss_curves.png")

    lineage = {
        "base_model": {"name": config.student, "path": base_path},
        "data": [{**asdict(run), "content": content} for run, content in zip(runs, contents)],
        "weights": weights_content(adapter_dir),
        "splits": {"train": len(train_set), "eval": len(eval_set) if eval_set is not None else 0,
                   "held_out": config.held_out, "seed": config.seed},
        "sft": config.model_dump(mode="json"),
        "hardware": asdict(hardware),
        # How it was launched: one process, or DDP / FSDP / DeepSpeed over several (accelerate, torchrun).
        "launch": {"processes": trainer.accelerator.num_processes,
                   "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1]},
        "resumed_from": str(resume_from) if resume and resume_from else None,
        "global_step": trainer.state.global_step,
        # trainer.train() alone: wall seconds and this process's CPU seconds (all threads)
        "train_seconds": round(train_seconds, 2), "train_cpu_seconds": round(train_cpu_seconds, 2),
        "budget": budget_reading(trainer, config),
        "metrics": metrics,
        "method": config.method,
        "distill": distill_info,
        "on_policy": on_policy_info,
        "loss_curves": str(curves) if curves else None,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started_at": started_at,
        "seconds": round(time.time() - started, 2),
    }
    lineage_path.write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
    write_cards(output_dir)  # README.md model cards from the lineage (and an eval of it, once there is one)
    merged_note = f", merged → {merged_dir}" if export_merged else ""
    console.print("[green]done[/] " + escape(f"adapter → {adapter_dir}{merged_note}, lineage → {lineage_path}"
                                             + (f", loss curves → {curves}" if curves else "")), highlight=False)
    return TrainResult(output_dir, adapter_dir, merged_dir if export_merged else None, lineage_path,
                       len(train_set), len(eval_set) if eval_set is not None else 0, trainer.state.global_step,
                       metrics, distill_info, on_policy_info)


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


# ---- loss curves --------------------------------------------------------------------------------------------
def plot_loss_curves(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Train and held-out loss against the step, from `trainer.state.log_history`, as a PNG (Agg: no display)."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    held = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    kd = [(entry["step"], entry["kd_loss"]) for entry in log_history if "kd_loss" in entry]
    if not train and not held:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue")
    if kd:
        axes.plot(*zip(*kd), label="train T²·KL (distill)", color="tab:blue", linestyle=":")
    if held:
        axes.plot(*zip(*held), label="held-out loss (cross-entropy)", color="tab:orange", marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _save_merged(model, tokenizer, base_path, adapter_dir, merged_dir, config, hardware, distributed=False) -> None:
    if config.qlora or distributed:
        # A 4-bit base cannot be merged into exactly; merge into the base loaded in half precision. Under
        # DDP/FSDP the main process merges a fresh copy too: its own model may be a shard.
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


# ---- list -------------------------------------------------------------------------------------------------
def find_students(directory: Path) -> list[dict[str, Any]]:
    """Trained students under `directory`: every lineage.json one or two levels down (sweeps included)."""
    directory = Path(directory)
    paths = sorted({*directory.glob("lineage.json"), *directory.glob("*/lineage.json"),
                    *directory.glob("*/sweep/*/lineage.json")})
    students = []
    for path in paths:
        try:
            lineage = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        distill = (lineage.get("sft") or {}).get("distill")
        on_policy = (lineage.get("sft") or {}).get("on_policy")
        scored = latest_eval(lineage) or {}
        students.append({
            "output_dir": str(path.parent),
            "base_model": (lineage.get("base_model") or {}).get("name"),
            "data": [run.get("path") for run in lineage.get("data") or []],
            "date": lineage.get("started_at"),
            "steps": lineage.get("global_step"),
            "eval_loss": (lineage.get("metrics") or {}).get("eval_loss"),
            "distill": f"alpha={distill['alpha']} T={distill['temperature']}" if distill else
            f"on_policy beta={on_policy['beta']} T={on_policy['temperature']}" if on_policy else None,
            "score": scored.get("score"),  # the last eval that scored it (eval run records it)
            "retention": scored.get("retention"),
            "latency_p50_s": (scored.get("perf") or {}).get("latency_p50_s"),
            "usd_per_1k_answers": (scored.get("perf") or {}).get("usd_per_1k_answers"),
        })
    return students
