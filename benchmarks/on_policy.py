"""sft, kd, on_policy from the base, and sft then on_policy at equal training time, on two CPU tasks.

--task demo (data/recipes/demo.yaml), or --task capitals: a low-data short-answer task on the base model's own
knowledge (data/tasks/capitals/: 45 training questions, 50+ golden ones about other countries; the teacher is the
same embedded model with a six-shot context, so the verified samples are few).

The teacher is the embedded SmolLM2-135M-Instruct with the demo's `teacher.context` (an instruction and three
worked examples); every student is the same base model with a LoRA adapter and sees the bare sentences. One
factory run (the demo's, with `teacher.logprobs: {top_k: 20}` so that kd has its logprobs) feeds all four;
the eval scores each merged student on the demo's golden set (60 items, exact JSON match, 95 % intervals).

Command (from the repository root; a finished step is not run again, so an interrupted run resumes):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/on_policy.py --task demo|capitals [--work runs/bench-on-policy]

Equal time: `sft` trains first (the recipe's epochs); its CPU seconds in trainer.train() (lineage.json
`train_cpu_seconds`) are the budget B. kd trains the recipe's epochs too (its time is in the table); on_policy
from the base trains for B (`sft.max_seconds`, `max_seconds_clock: cpu`: CPU time, which a machine shared with
other work does not shrink); "sft ½ → on_policy ½" trains sft for B/2 and then on_policy for B/2; "sft →
on_policy ½" adds B/2 of on_policy to the whole sft student (1.5 B in all).

Writes benchmarks/results/on_policy_TASK.md. Teacher tokens: for sft and kd, what the factory run's teacher read
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


def run(command: list[str], log: Path) -> float:
    """Run a command from the repository root, its output into `log`; its wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return round(time.monotonic() - started, 1)


CAPITALS_CONTEXT = [
    {"role": "system", "content": "You are a geography expert. Reply with the city's name and nothing else."},
    *[turn for question, city in [("What is the capital of Peru?", "Lima"), ("Which city is the capital of Kenya?", "Nairobi"),
                                  ("Name the capital city of Norway.", "Oslo"),
                                  ("What city serves as the capital of Brazil?", "Brasilia"),
                                  ("What is the capital of Iceland?", "Reykjavik"),
                                  ("Which city is the capital of Tanzania?", "Dodoma")]
      for turn in ({"role": "user", "content": question}, {"role": "assistant", "content": city})]]


def task_recipe(task: str, work: Path) -> tuple[Path, Path, int]:
    """The task's recipe (written into the work folder for capitals), its golden file and eval max_tokens."""
    if task == "demo":
        return RECIPE, REPO / "data" / "golden" / "extraction.jsonl", 32
    recipe = yaml.safe_load(RECIPE.read_text())
    factory = recipe["factory"]
    factory["prompts"] = {"path": str(REPO / "data" / "tasks" / "capitals" / "prompts.jsonl")}
    factory["teacher"]["context"] = CAPITALS_CONTEXT
    factory["teacher"]["params"]["max_tokens"] = 12
    factory["checks"] = ["empty", {"name": "reference", "mode": "normalized"}]
    recipe["sft"]["epochs"] = 3  # few samples: three passes, as one would train on a small set
    recipe["sft"]["eval_every_steps"] = 1000
    golden = REPO / "data" / "tasks" / "capitals" / "golden.jsonl"
    recipe["eval"] = {"golden": [str(golden)]}
    recipe.pop("serve", None)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, golden, 12


def arms(work: Path, batch: int, tokens: int, budget: float | None, sft_steps: int | None) -> dict[str, list[str]]:
    """Each arm's --set list; the budgeted ones once sft's CPU seconds (B) and steps are known (None: not yet)."""
    data = f"sft.data=[{work / 'data'}]"

    def on_policy(seconds: float) -> list[str]:
        # A time budget, not a step count: the schedule cannot know the end, so the learning rate is constant.
        return ["sft.method=on_policy", "sft.max_steps=100000", "sft.eval_every_steps=100000",
                f"sft.max_seconds={seconds:.1f}", "sft.max_seconds_clock=cpu", "sft.lr_scheduler=constant",
                "sft.warmup_ratio=0",
                f"sft.per_device_batch_size={batch}", f"sft.on_policy={{max_completion_length: {tokens}}}",
                "sft.held_out=0"]  # every prompt trains; the golden set is the measure

    every = {"sft": [data, f"sft.output_dir={work / 'sft'}"],
             "kd": [data, f"sft.output_dir={work / 'kd'}", "sft.method=kd"]}
    if budget is not None and sft_steps is not None:
        every.update({
            "on_policy": [data, f"sft.output_dir={work / 'on_policy'}", *on_policy(budget)],
            # the same method for half the time: half the steps, with the schedule fitted to them
            "sft ½": [data, f"sft.output_dir={work / 'sft_half'}", f"sft.max_steps={max(1, round(sft_steps / 2))}"],
            "sft ½ → on_policy ½": [data, f"sft.output_dir={work / 'sft_half_on_policy'}", *on_policy(budget / 2),
                                    f"sft.init_from={work / 'sft_half'}"],
            "sft → on_policy ½": [data, f"sft.output_dir={work / 'sft_on_policy'}", *on_policy(budget / 2),
                                  f"sft.init_from={work / 'sft'}"],
            # Longer on-policy runs (--arms): what more compute buys when the teacher's verified samples are few.
            "on_policy 4": [data, f"sft.output_dir={work / 'on_policy_4b'}", *on_policy(budget * 4)],
            "sft → on_policy 2": [data, f"sft.output_dir={work / 'sft_on_policy_2b'}", *on_policy(budget * 2),
                                  f"sft.init_from={work / 'sft'}"],
        })
    return every


ARMS = "sft,kd,on_policy,sft ½,sft ½ → on_policy ½,sft → on_policy ½"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["demo", "capitals"], default="demo")
    parser.add_argument("--work", type=Path, default=None, help="default: runs/bench-on-policy (demo), "
                        "runs/bench-on-policy-capitals")
    parser.add_argument("--on-policy-batch", type=int, default=8, help="prompts per on-policy step")
    parser.add_argument("--on-policy-tokens", type=int, default=None,
                        help="max_completion_length of the samples (default: the eval's max_tokens)")
    parser.add_argument("--arms", default=ARMS,
                        help="the arms to train, in this order (comma-separated); the eval scores every finished one")
    parser.add_argument("--train-only", action="store_true", help="train the arms, then stop (no eval, no table)")
    parser.add_argument("--references-only", action="store_true", help="evaluate the teacher and the base, then stop")
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the evals already done (arms without one are named as not measured)")
    args = parser.parse_args()
    work = (args.work or REPO / "runs" / ("bench-on-policy" if args.task == "demo" else "bench-on-policy-capitals")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe, golden, max_tokens = task_recipe(args.task, work)
    tokens = args.on_policy_tokens or max_tokens
    python = sys.executable
    walls_path = work / "walls.json"  # every invocation's wall times, so that a resumed run reports them all
    walls: dict[str, float] = json.loads(walls_path.read_text()) if walls_path.is_file() else {}

    manifest_path = work / "data" / "manifest.json"
    if not (manifest_path.is_file() and json.loads(manifest_path.read_text()).get("status") == "complete"):
        walls["generate"] = run([python, "-m", "factory", "generate", str(recipe), "--set",
                                 f"factory.output_dir={work / 'data'}", "--set", "factory.teacher.logprobs={top_k: 20}"],
                                work / "generate.log")
    manifest = json.loads(manifest_path.read_text())
    data_tokens = manifest["this_run"]["input_tokens"] + manifest["this_run"]["output_tokens"]

    for name in [] if args.table_only else [part.strip() for part in args.arms.split(",") if part.strip()]:
        every = arms(work, args.on_policy_batch, tokens, *budget(work))
        if name not in every:
            sys.exit(f"arm {name!r} needs the sft arm's time budget first: put sft before it in --arms")
        sets = every[name]
        out = Path(sets[1].split("=", 1)[1])
        if not (out / "lineage.json").is_file():
            command = [python, "-m", "sft", "train", str(recipe)] + [part for s in sets for part in ("--set", s)]
            walls[name] = run(command, work / f"train-{out.name}.log")
            walls_path.write_text(json.dumps(walls))

    if args.train_only:
        return
    every = arms(work, args.on_policy_batch, tokens, *budget(work))
    # The references (teacher, base) in one eval, each student in its own: each runs once its models exist.
    references = [{"name": "teacher (with context)", "role": "teacher", "provider": "local",
                   "model": "builtin:smollm2-135m-instruct", "batch_size": 20,
                   "context": yaml.safe_load(recipe.read_text())["factory"]["teacher"]["context"]},
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
        models.update(evaluate(work, label, group, golden, max_tokens, walls))
        walls_path.write_text(json.dumps(walls))
    if args.references_only:
        return
    first = [model["name"] for model in references if model["name"] in models]
    models = {**{name: models[name] for name in first}, **{k: v for k, v in models.items() if k not in first}}
    results = write_table(work, models, data_tokens, walls, args, golden, tokens, manifest)
    print(results.read_text())


def budget(work: Path) -> tuple[float | None, int | None]:
    """B: the sft arm's CPU seconds in trainer.train(), and its steps (None before it has trained)."""
    lineage = work / "sft" / "lineage.json"
    if not lineage.is_file():
        return None, None
    done = json.loads(lineage.read_text())
    return float(done["train_cpu_seconds"]), int(done["global_step"])


def evaluate(work: Path, label: str, models: list[dict], golden: Path, max_tokens: int,
             walls: dict[str, float]) -> dict[str, dict]:
    """`python -m eval run` on the golden set for these models (skipped when their results are there)."""
    recipe = work / f"{label}.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {
        "output_dir": str(work / label), "golden": [str(golden)],
        "params": {"temperature": 0, "max_tokens": max_tokens}, "perf_prompts": 0, "speculative": False,
        "models": models}}))
    results_path = work / label / "results.json"
    scored = set(json.loads(results_path.read_text())["models"]) if results_path.is_file() else set()
    if scored != {model["name"] for model in models}:
        walls[label] = run([sys.executable, "-m", "eval", "run", str(recipe)], work / f"{label}.log")
    return json.loads(results_path.read_text())["models"]


def write_table(work: Path, models: dict[str, dict], data_tokens: int, walls: dict[str, float],
                args: argparse.Namespace, golden: Path, tokens: int, manifest: dict) -> Path:
    rows = []
    teacher = (models.get("teacher (with context)") or {"metrics": {"overall": {"mean": None}}})["metrics"]["overall"]["mean"]
    for name, model in models.items():
        overall = model["metrics"]["overall"]
        score = f"{overall['mean']:.1%} [{overall['low']:.1%}, {overall['high']:.1%}]"
        lineage_path = Path(model["model"]).parent / "lineage.json"
        steps_cell, train_s, cpu_s, cost = "—", "—", "—", "—"
        if lineage_path.is_file():
            lineage = json.loads(lineage_path.read_text())
            steps_cell = str(lineage["global_step"])
            train_s, cpu_s = f"{lineage['train_seconds']:.0f}", f"{lineage['train_cpu_seconds']:.0f}"
            start = lineage["sft"].get("init_from")
            if start:  # the time of the student it started from counts too
                first = json.loads((Path(start) / "lineage.json").read_text())
                steps_cell = f"{first['global_step']} + {steps_cell}"
                cpu_s = f"{first['train_cpu_seconds']:.0f} + {cpu_s}"
                train_s = f"{first['train_seconds']:.0f} + {train_s}"
            on_policy = lineage.get("on_policy")
            scored = on_policy["scoring"]["train"]["teacher_tokens"] if on_policy else 0
            from_data = not on_policy or start
            cost = f"{scored + (data_tokens if from_data else 0):,}"
            if on_policy:
                cost += f" ({scored:,} scoring" + (f" + {data_tokens:,} data)" if from_data else ")")
        elif name.startswith("teacher"):
            cost = f"{data_tokens:,} (the factory run)"
        ret = f"{overall['mean'] / teacher:.2f}" if teacher else "—"
        rows.append(f"| {name} | {score} | {ret} | {steps_cell} | {cpu_s} | {train_s} | {cost} |")
    missing = [name for name in ["sft", "kd", "on_policy", "sft ½", "sft ½ → on_policy ½", "sft → on_policy ½",
                                 "teacher (with context)", "base (no training)"] if name not in models]
    b, _ = budget(work)
    counts = manifest.get("counts") or {}
    accepted = counts.get("accepted", manifest.get("accepted"))
    rejected = counts.get("rejected", manifest.get("rejected"))
    load = os.getloadavg()[0]
    threads = os.environ.get("OMP_NUM_THREADS", "default (all cores)")
    task = ("the demo (data/recipes/demo.yaml): extract name and city into JSON; teacher = embedded "
            "SmolLM2-135M-Instruct with the demo's `teacher.context` (an instruction, three worked examples)"
            if args.task == "demo" else
            "capitals (data/tasks/capitals/, this script's recipe in the work folder): the capital of a country, "
            "the city's name only; teacher = embedded SmolLM2-135M-Instruct with a six-shot context "
            "(`CAPITALS_CONTEXT` here); sft for 3 epochs (few samples)")
    lines = [
        f"# on_policy: {args.task}",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on the project machine, shared with other "
        f"engineers' processes (load average {load:.2f} at the end): wall seconds are indicative; the budget is "
        "counted in CPU seconds, which the load does not shrink.",
        "",
        f"Command: `OMP_NUM_THREADS={threads} .venv/bin/python benchmarks/on_policy.py --task {args.task} "
        f"--on-policy-batch {args.on_policy_batch} --on-policy-tokens {tokens}`"
        + (f" (the default arms; this table after `--arms \"{args.arms}\"`)" if args.arms != ARMS else "")
        + (" (this table: `--table-only`)" if args.table_only else ""),
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only, float32, "
        f"torch threads per process: {threads}",
        "",
        f"Task: {task}. The factory run: {accepted} accepted, {rejected} rejected samples (rejection sampling on "
        "the reference), with the teacher's top-20 logprobs for kd. Each student = the same base with a LoRA "
        "adapter (r=16) on the bare prompts, lr 2e-4, batch 8; kd alpha 0.8, T 2. "
        f"on_policy: each step samples {args.on_policy_batch} prompts (max {tokens} tokens, temperature 1), the "
        "teacher with its context scores every token, the student minimises the reverse KL; constant learning "
        "rate (a time budget has no known end for a schedule). "
        + (f"Budget B = the sft arm's {b:.0f} CPU seconds in trainer.train(). " if b else "")
        + f"Golden set: {golden.relative_to(REPO)} ({overall['n']} items), greedy.",
        "",
        "| model | golden score [95 % interval] | score / teacher's | steps | train CPU s | train wall s | teacher tokens |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *([f"Not measured in this run: {', '.join(missing)}.", ""] if missing else []),
        "Wall times (s, model loading included) of the steps run through this script: "
        + ", ".join(f"{name} {seconds:.0f}" for name, seconds in walls.items()),
        "",
    ]
    results = REPO / "benchmarks" / "results" / f"on_policy_{args.task}.md"
    results.write_text("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
