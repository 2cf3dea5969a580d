"""How fast the student samples while it trains (on-policy distillation's generation), side by side in one run:
the embedded SmolLM2-135M with a LoRA adapter in train mode with gradient checkpointing on (as `sft train`
leaves it), the same with `use_cache=True` forced, and in eval mode.

    .venv/bin/python benchmarks/student_generation.py [--prompts 4] [--tokens 24] [--threads 2] [--rounds 3]

It asks whether generation during training runs without a KV cache (every decoding step recomputing the whole
sequence): if it did, the train-mode rows would be many times slower than the eval-mode row.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.builtin import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model("builtin:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Maria moved to Lisbon in spring, {i}."}],
                                           tokenize=False, add_generation_prompt=True) for i in range(args.prompts)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    cases = [("train mode, gradient checkpointing", True, {}),
             ("train mode, gradient checkpointing, use_cache=True", True, {"use_cache": True}),
             ("eval mode", False, {})]
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):
        for name, training, extra in cases:
            model.train(training)
            with torch.no_grad():
                started = time.perf_counter()
                model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True,
                               pad_token_id=tokenizer.pad_token_id, **extra)
                times[name].append(time.perf_counter() - started)
    print(f"Command: .venv/bin/python benchmarks/student_generation.py --prompts {args.prompts} --tokens {args.tokens} "
          f"--threads {args.threads} --rounds {args.rounds}")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
          f"{torch.__version__}; 1-minute load average {os.getloadavg()[0]:.2f}\n")
    print("| student | generation s (median of rounds) | s per decoding step | per round |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / args.tokens:.3f} | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
