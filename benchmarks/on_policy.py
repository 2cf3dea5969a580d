"""sft, kd, on_policy from the base, and sft then on_policy, on the CPU demo task (data/recipes/demo.yaml).

The teacher is the embedded SmolLM2-135M-Instruct with the demo's `teacher.context` (an instruction and three
worked examples); every student is the same base model with a LoRA adapter and sees the bare sentences. One
factory run (the demo's, with `teacher.logprobs: {top_k: 20}` so that kd has its logprobs) feeds all four;
the eval scores each merged student on the demo's golden set (60 items, exact JSON match, 95 % intervals).

Command (from the repository root; a finished step is not run again, so an interrupted run resumes):

    .venv/bin/python benchmarks/on_policy.py [--work runs/bench-on-policy] [--on-policy-steps 30]

Writes benchmarks/results/on_policy.md. Teacher tokens: for sft and kd, what the factory run's teacher read
and wrote (its manifest); for on_policy, what the teacher read while scoring the training samples (the
student's lineage.json), plus the factory run's for sft then on_policy, which needs the sft student first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "data" / "recipes" / "demo.yaml"
RESULTS = REPO / "benchmarks" / "results" / "on_policy.md"


def run(command: list[str], log: Path) -> float:
    """Run a command from the repository root, its output into `log`; its wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return round(time.monotonic() - started, 1)


def arms(work: Path, steps: int, batch: int, tokens: int) -> dict[str, list[str]]:
    data = f"sft.data=[{work / 'data'}]"
    on_policy = ["sft.method=on_policy", f"sft.max_steps={steps}", "sft.eval_every_steps=1000",
                 f"sft.per_device_batch_size={batch}", f"sft.on_policy={{max_completion_length: {tokens}}}",
                 "sft.held_out=0"]  # every prompt trains; the golden set is the measure
    return {
        "sft": [data, f"sft.output_dir={work / 'sft'}"],
        "kd": [data, f"sft.output_dir={work / 'kd'}", "sft.method=kd"],
        "on_policy": [data, f"sft.output_dir={work / 'on_policy'}", *on_policy],
        "sft → on_policy": [data, f"sft.output_dir={work / 'sft_on_policy'}", *on_policy,
                            f"sft.init_from={work / 'sft'}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-on-policy")
    parser.add_argument("--on-policy-steps", type=int, default=30)
    parser.add_argument("--on-policy-batch", type=int, default=8, help="prompts per on-policy step")
    parser.add_argument("--on-policy-tokens", type=int, default=32, help="max_completion_length of the samples")
    parser.add_argument("--arms", default="sft,kd,on_policy,sft → on_policy",
                        help="the arms to train, in this order (comma-separated); the eval scores every finished one")
    parser.add_argument("--train-only", action="store_true", help="train the arms, then stop (no eval, no table)")
    parser.add_argument("--references-only", action="store_true", help="evaluate the teacher and the base, then stop")
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the evals already done (arms without one are named as not measured)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    walls_path = work / "walls.json"  # every invocation's wall times, so that a resumed run reports them all
    walls: dict[str, float] = json.loads(walls_path.read_text()) if walls_path.is_file() else {}

    manifest_path = work / "data" / "manifest.json"
    if not (manifest_path.is_file() and json.loads(manifest_path.read_text()).get("status") == "complete"):
        walls["generate"] = run([python, "-m", "factory", "generate", str(RECIPE), "--set",
                                 f"factory.output_dir={work / 'data'}", "--set", "factory.teacher.logprobs={top_k: 20}"],
                                work / "generate.log")
    manifest = json.loads(manifest_path.read_text())
    data_tokens = manifest["this_run"]["input_tokens"] + manifest["this_run"]["output_tokens"]

    every = arms(work, args.on_policy_steps, args.on_policy_batch, args.on_policy_tokens)
    for name in [] if args.table_only else [part.strip() for part in args.arms.split(",") if part.strip()]:
        sets = every[name]
        out = Path(sets[1].split("=", 1)[1])
        if not (out / "lineage.json").is_file():
            command = [python, "-m", "sft", "train", str(RECIPE)] + [part for s in sets for part in ("--set", s)]
            walls[name] = run(command, work / f"train-{out.name}.log")
            walls_path.write_text(json.dumps(walls))

    if args.train_only:
        return
    # The references (teacher, base) in one eval, each student in its own: each runs once its models exist.
    references = [{"name": "teacher (with context)", "role": "teacher", "provider": "local",
                   "model": "builtin:smollm2-135m-instruct", "batch_size": 20,
                   "context": yaml.safe_load(RECIPE.read_text())["factory"]["teacher"]["context"]},
                  {"name": "base (no training)", "role": "baseline", "provider": "local",
                   "model": "builtin:smollm2-135m-instruct", "batch_size": 20}]
    groups: list[tuple[str, list[dict]]] = []
    for name, sets in every.items():  # one eval per student, each run as soon as its student is trained
        out = Path(sets[1].split("=", 1)[1])
        if (out / "lineage.json").is_file():
            groups.append((f"eval-{out.name}", [{"name": name, "provider": "local", "model": str(out / "merged"),
                                                 "batch_size": 20}]))
    if args.references_only:
        groups = []
    groups.append(("eval-references", references))  # last: its eval can run during the students' training
    models: dict[str, dict] = {}
    for label, group in groups:
        if args.table_only:
            done = work / label / "results.json"
            models.update(json.loads(done.read_text())["models"] if done.is_file() else {})
            continue
        models.update(evaluate(work, label, group, walls))
        walls_path.write_text(json.dumps(walls))
    if args.references_only:
        return
    first = [model["name"] for model in references if model["name"] in models]
    models = {**{name: models[name] for name in first}, **{k: v for k, v in models.items() if k not in first}}
    write_table(work, models, data_tokens, walls, args)
    print(RESULTS.read_text())


def evaluate(work: Path, label: str, models: list[dict], walls: dict[str, float]) -> dict[str, dict]:
    """`python -m eval run` on the golden set for these models (skipped when their results are there)."""
    recipe = work / f"{label}.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {
        "output_dir": str(work / label), "golden": [str(REPO / "data" / "golden" / "extraction.jsonl")],
        "params": {"temperature": 0, "max_tokens": 32}, "perf_prompts": 0, "speculative": False,
        "models": models}}))
    results_path = work / label / "results.json"
    scored = set(json.loads(results_path.read_text())["models"]) if results_path.is_file() else set()
    if scored != {model["name"] for model in models}:
        walls[label] = run([sys.executable, "-m", "eval", "run", str(recipe)], work / f"{label}.log")
    return json.loads(results_path.read_text())["models"]


def write_table(work: Path, models: dict[str, dict], data_tokens: int, walls: dict[str, float],
                args: argparse.Namespace) -> None:
    steps, batch, tokens = args.on_policy_steps, args.on_policy_batch, args.on_policy_tokens
    rows = []
    teacher = (models.get("teacher (with context)") or {"metrics": {"overall": {"mean": None}}})["metrics"]["overall"]["mean"]
    for name, model in models.items():
        overall = model["metrics"]["overall"]
        score = f"{overall['mean']:.1%} [{overall['low']:.1%}, {overall['high']:.1%}]"
        lineage_path = Path(model["model"]).parent / "lineage.json"
        steps_cell, train_s, cost = "—", "—", "—"
        if lineage_path.is_file():
            lineage = json.loads(lineage_path.read_text())
            steps_cell, train_s = str(lineage["global_step"]), f"{lineage['seconds']:.0f}"
            on_policy = lineage.get("on_policy")
            scored = on_policy["scoring"]["train"]["teacher_tokens"] if on_policy else 0
            from_data = not on_policy or lineage["sft"].get("init_from")
            cost = f"{scored + (data_tokens if from_data else 0):,}"
            if on_policy:
                cost += f" ({scored:,} scoring" + (f" + {data_tokens:,} data)" if from_data else ")")
        elif name.startswith("teacher"):
            cost = f"{data_tokens:,} (the factory run)"
        ret = f"{overall['mean'] / teacher:.2f}" if teacher else "—"
        rows.append(f"| {name} | {score} | {ret} | {steps_cell} | {train_s} | {cost} |")
    missing = [name for name in [*arms(work, steps, batch, tokens), "teacher (with context)", "base (no training)"]
               if name not in models]
    load = os.getloadavg()[0]
    lines = [
        "# on_policy",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on the project machine, shared with other "
        f"engineers' processes (load average {load:.2f} at the end): timings are indicative only.",
        "",
        f"Command: `.venv/bin/python benchmarks/on_policy.py --on-policy-steps {steps} --on-policy-batch {batch} "
        f"--on-policy-tokens {tokens}`" + (" (this table: `--table-only`, after the steps below)" if args.table_only
                                           else ""),
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only, float32",
        "",
        "Task: the demo (data/recipes/demo.yaml): teacher = embedded SmolLM2-135M-Instruct with the demo's "
        "`teacher.context`; each student = the same base with a LoRA adapter (r=16) on the bare sentences, "
        "lr 2e-4, batch 8. sft and kd: the demo's settings (1 epoch over the accepted samples; kd alpha 0.8, T 2). "
        f"on_policy: the steps in the table, each on {batch} of the student's own samples (max {tokens} tokens, "
        "temperature 1, reverse KL), "
        "scored by the teacher with its context; sft → on_policy starts from the sft student's adapter. "
        "Golden set: data/golden/extraction.jsonl (60 items, exact JSON match), greedy, 32 tokens.",
        "",
        "| model | golden score [95 % interval] | score / teacher's | steps | train s | teacher tokens |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *([f"Not measured in this run: {', '.join(missing)}.", ""] if missing else []),
        "Wall times (s, model loading included) of the steps run through this script: "
        + ", ".join(f"{name} {seconds:.0f}" for name, seconds in walls.items()),
        "",
    ]
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
