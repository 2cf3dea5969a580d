"""Training throughput of `sft.train.train(...)` against a plain TRL SFTTrainer script, side by side.

Question: does our trainer (recipe → runs → SFTTrainer + LoRA, checkpoints for --resume, lineage, loss
curves) cost training speed compared with the script an engineer writes by hand with TRL and peft?

Both arms train the same model (the embedded SmolLM2-135M-Instruct, the demo student) on the same
factory-format run (a JSONL this script writes: accepted.jsonl with prompt/completion records of about
60–250 tokens), with the same settings: LoRA r=16, alpha=32, dropout 0.05 on all linear layers, batch 4,
max_length 256, the same number of steps, lr 2e-4 cosine, gradient checkpointing on (both libraries'
default), completion-only loss, float32 on the CPU, seed 0. They run in one process, alternating
(ABBA order per pair of rounds, so a drift in machine load hits both), with `torch.set_num_threads` set
once at the start.

Figure: tokens/s of `trainer.train()` = tokens trained on (SFTTrainer's `num_tokens`: prompt and
completion, no padding) / `train_runtime`. Both arms see the same batches, so the token counts agree.
End-to-end seconds per call (model loading, dataset preparation, saving the adapter; our arm also writes
lineage.json and the loss-curve PNG) are reported beside it. Our arm saves a checkpoint at its last step
(what --resume needs); that write is inside its train_runtime, and the plain script's
`save_strategy="no"` has none.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 10 --rounds 4 --threads N --out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "builtin:smollm2-135m-instruct"
SETTINGS = dict(batch=4, max_length=256, lr=2e-4, r=16, alpha=32, dropout=0.05)
WORDS = ("the model answers each question with care and a short reason so that a student can learn how a "
         "teacher explains facts numbers places people history science and simple steps of arithmetic").split()


def write_run(run_dir: Path, count: int, seed: int = 0) -> Path:
    """A factory-format run: accepted.jsonl (full Sample records) and a manifest."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "accepted.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(count):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "?"
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 160))) + "."
            handle.write(json.dumps({
                "id": f"{i:024x}", "prompt_id": f"p{i}", "sample_index": 0,
                "prompt": [{"role": "system", "content": "Answer briefly and correctly."},
                           {"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
                "teacher": {"provider": "local", "model": MODEL, "params": {}}, "attributes": {},
                "usage": {}, "finish_reason": "stop", "checks": [], "rejected_by": None,
            }) + "\n")
    (run_dir / "manifest.json").write_text(json.dumps({"fingerprint_hash": "bench"}), encoding="utf-8")
    return run_dir


def run_ours(run_dir: Path, out: Path, steps: int) -> dict:
    from sft.config import SFTConfig
    from sft.train import train

    config = SFTConfig(
        student=MODEL, data=[run_dir], output_dir=out, held_out=0, seed=0, max_length=SETTINGS["max_length"],
        learning_rate=SETTINGS["lr"], per_device_batch_size=SETTINGS["batch"], max_steps=steps, logging_steps=1,
        eval_every_steps=steps, lr_scheduler="cosine", warmup_ratio=0.03,
        lora={"r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": SETTINGS["dropout"]},
    )
    from rich.console import Console

    started = time.perf_counter()
    result = train(config, console=Console(stderr=True, quiet=True), export_merged=False)
    wall = time.perf_counter() - started
    return {"tokens": result.metrics["train_tokens"], "runtime": result.metrics["train_runtime"], "wall": wall}


def run_plain(run_dir: Path, out: Path, steps: int) -> dict:
    """What an engineer writes by hand: load the JSONL, SFTTrainer + a LoRA config, train, save the adapter."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from factory.builtin import resolve_model

    started = time.perf_counter()
    path = resolve_model(MODEL)
    dataset = load_dataset("json", data_files=str(run_dir / "accepted.jsonl"), split="train")
    dataset = dataset.select_columns(["prompt", "completion"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out), seed=0, data_seed=0, max_steps=steps, per_device_train_batch_size=SETTINGS["batch"],
        learning_rate=SETTINGS["lr"], lr_scheduler_type="cosine", warmup_steps=0.03,
        max_length=SETTINGS["max_length"], completion_only_loss=True, gradient_checkpointing=True,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=SETTINGS["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    outcome = trainer.train()
    trainer.save_model(str(out / "adapter"))
    wall = time.perf_counter() - started
    tokens = next(e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e)
    return {"tokens": float(tokens), "runtime": float(outcome.metrics["train_runtime"]), "wall": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4, help="runs per arm, alternating (ABBA)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    from factory.builtin import resolve_model

    resolve_model(MODEL)  # convert once, outside the timings
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {"plain TRL SFTTrainer script": [], "sft.train.train": []}
    arms = {"plain TRL SFTTrainer script": run_plain, "sft.train.train": run_ours}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = write_run(Path(tmp) / "run", args.samples)
        for round_ in range(args.rounds):
            order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
            for name in order:
                figures = arms[name](run_dir, Path(tmp) / f"{name[:5]}-{round_}", args.steps)
                figures["tokens_per_s"] = figures["tokens"] / figures["runtime"]
                results[name].append(figures)
                print(f"round {round_ + 1} {name}: {figures['tokens_per_s']:.1f} tokens/s "
                      f"({figures['tokens']:.0f} tokens in {figures['runtime']:.1f} s; call {figures['wall']:.1f} s)",
                      flush=True)
    load_after = os.getloadavg()

    base = statistics.median(r["tokens_per_s"] for r in results["plain TRL SFTTrainer script"])
    lines = [
        f"Command: `.venv/bin/python benchmarks/sft_throughput.py --steps {args.steps} --rounds {args.rounds} "
        f"--threads {args.threads}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}; torch.set_num_threads({args.threads})",
        "Versions: " + ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "trl", "peft", "datasets")),
        f"Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"Setup: {MODEL}, {args.samples} samples, LoRA r={SETTINGS['r']} alpha={SETTINGS['alpha']}, "
        f"batch {SETTINGS['batch']}, max_length {SETTINGS['max_length']}, {args.steps} steps, float32 CPU",
        "",
        "| trainer | tokens/s (median) | per round | s per call (median) | ratio to plain TRL |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        per_round = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        lines.append(f"| {name} | {rate:.1f} | {per_round} | {wall:.1f} | {rate / base:.3f} |")
    tokens = {name: {r["tokens"] for r in runs} for name, runs in results.items()}
    lines.append("")
    lines.append(f"Tokens per run: {tokens} (equal: both arms trained on the same batches).")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
