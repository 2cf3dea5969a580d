"""Does `sft sweep` on the CPU demo rank trials by golden-set score, resume after `kill -9` without retraining
finished trials, and write the best recipe, and what does the sweep itself add to each trial beyond training
and eval?

The demo (data/recipes/demo.yaml: the embedded SmolLM2-135M as teacher with context and as student) is
generated with the teacher's top-20 logprobs, then swept over distillation temperature, alpha and learning
rate, each trial scored by `eval` on data/golden/extraction.jsonl. The sweep runs as `python -m sft sweep` in a
subprocess, is killed with SIGKILL once `--kill-after` trials have finished and another has a checkpoint,
and is run again to the end. Writes benchmarks/results/sweep.md.

    .venv/bin/python benchmarks/sweep.py --trials 8 --fraction 0.25 --max-steps 4 --kill-after 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sweep.md"


def run(args: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/apprentice-sweep-bench"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=3, help="kill -9 once this many trials have finished")
    parser.add_argument("--prompts", type=int, default=120, help="demo prompts generated (--limit)")
    parser.add_argument("--golden", type=int, default=60, help="golden items each trial is scored on")
    parser.add_argument("--data", type=Path, default=None,
                        help="an existing demo run with top-20 logprobs to sweep on (default: generate WORK/demo)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the results from the work folder as it stands (a resumed run stopped early)")
    parser.add_argument("--lr", type=float, nargs=2, default=(1e-4, 3e-3), metavar=("LOW", "HIGH"),
                        help="learning-rate range, drawn on a log scale")
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    load_before = os.getloadavg()[0]

    demo = yaml.safe_load((REPO / "data/recipes/demo.yaml").read_text(encoding="utf-8"))
    golden = work / "golden.jsonl"
    golden.write_text("".join((REPO / "data/golden/extraction.jsonl").read_text(encoding="utf-8")
                              .splitlines(keepends=True)[:options.golden]), encoding="utf-8")
    data_dir = options.data.resolve() if options.data else work / "demo"
    demo["factory"]["output_dir"] = str(data_dir)
    demo["factory"]["teacher"]["logprobs"] = {"top_k": 20}
    demo["sft"].update({
        "data": [str(data_dir)], "output_dir": str(work / "sft"), "max_steps": options.max_steps,
        "eval_every_steps": 3, "distill": {"alpha": 0.8, "temperature": 2.0},
        "sweep": {"trials": options.trials, "fraction": options.fraction, "objective": "eval", "prune": True,
                  "prune_after_trials": 3,
                  "space": {"temperature": [1.0, 2.0, 4.0, 8.0], "alpha": {"low": 0.0, "high": 1.0},
                            "learning_rate": {"low": options.lr[0], "high": options.lr[1], "log": True}}},
    })
    demo["eval"].update({"output_dir": str(work / "eval"), "golden": [str(golden)]})
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(demo, sort_keys=False), encoding="utf-8")

    state_path = work / "state.json"
    if options.report_only:
        return report(options, json.loads(state_path.read_text(encoding="utf-8")), work / "sft" / "sweep", load_before,
                      resumed_s=None)
    generate_s = None
    if not (data_dir / "accepted.jsonl").is_file():
        generate_s = run(["-m", "factory", "generate", str(recipe), "--limit", str(options.prompts), "-q"], env)
    records = [json.loads(line) for line in (data_dir / "accepted.jsonl").open(encoding="utf-8") if line.strip()]
    accepted = f"{len(records)} accepted samples of {len({r['prompt_id'] for r in records})} prompts"

    root = work / "sft" / "sweep"
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "sft", "sweep", str(recipe), "-q"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = None
    while process.poll() is None:
        done = list(root.glob("trial-*/trial.json"))
        partial = [p for p in root.glob("trial-*/checkpoints/checkpoint-*/trainer_state.json")
                   if not (p.parents[2] / "trial.json").exists()]
        if len(done) >= options.kill_after and partial:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            killed_at = time.monotonic() - started
            break
        time.sleep(0.5)
    first_s = time.monotonic() - started
    state = {"generate_s": generate_s, "accepted": accepted, "killed_at": killed_at, "first_s": first_s,
             "before": {p.parent.name: p.stat().st_mtime_ns for p in root.glob("trial-*/trial.json")}}
    state_path.write_text(json.dumps(state), encoding="utf-8")

    resumed_started = time.monotonic()
    subprocess.run([sys.executable, "-m", "sft", "sweep", str(recipe), "-q"], cwd=REPO, env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return report(options, state, root, load_before, resumed_s=time.monotonic() - resumed_started)


def report(options, state, root: Path, load_before: float, resumed_s: float | None) -> int:
    after = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("trial-*/trial.json")}
    retrained = [name for name, stamp in state["before"].items() if after.get(name) != stamp]
    data = json.loads((root / "sweep.json").read_text(encoding="utf-8"))
    write_results(options, data["trials"], data, state["generate_s"], state["accepted"], state["killed_at"],
                  state["first_s"], resumed_s, state["before"], retrained, load_before, os.getloadavg()[0], root)
    print(RESULTS.read_text(encoding="utf-8"))
    return 0


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_results(options, rows, data, generate_s, accepted, killed_at, first_s, resumed_s, before, retrained,
                  load_before, load_after, root: Path) -> None:
    import importlib.metadata as md

    complete = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    # Trials that trained (a trial drawn twice reads the first one's figures: its trial time is shorter).
    inside = [r["trial_s"] - (r["train_s"] or 0) - (r["eval_s"] or 0) for r in rows
              if r.get("trial_s") is not None and r.get("train_s") is not None and r["trial_s"] >= r["train_s"]]
    best = json.loads(json.dumps(rows[0])) if rows and rows[0]["value"] is not None else None
    command = (f".venv/bin/python benchmarks/sweep.py --trials {options.trials} --fraction {options.fraction} "
               f"--max-steps {options.max_steps} --kill-after {options.kill_after} --prompts {options.prompts} "
               f"--golden {options.golden} --lr {options.lr[0]:g} {options.lr[1]:g}"
               + (f" --data {options.data}" if options.data else "") + f" --work {options.work}")
    versions = ", ".join(f"{name} {md.version(name)}" for name in ("torch", "transformers", "trl", "peft", "optuna"))
    lines = [
        "# sweep", "",
        f"Measured {time.strftime('%Y-%m-%d')} on the project machine (2 cores shared with other engineers' processes; "
        "**the machine was loaded**, figures move by tens of percent with the load).", "",
        f"Command: `{command}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}",
        f"Versions: {versions}",
        f"Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}; torch threads: "
        f"{os.environ.get('OMP_NUM_THREADS', 'default (all cores)')} (OMP_NUM_THREADS)",
        f"Setup: data/recipes/demo.yaml with the teacher's top-20 logprobs ({accepted}"
        + (f", generated in {generate_s:.0f} s" if generate_s else ", generated before") + "); "
        f"`sft.distill` on; each trial trains on {options.fraction:g} of the training split for at most "
        f"{options.max_steps} steps (small, on purpose: a shared CPU) and is scored by eval on the first "
        f"{options.golden} items of data/golden/extraction.jsonl; MedianPruner after 3 trials; TPE seed 0.",
        "", "## Trials, best first (sweep.md as the sweep wrote it)", "",
    ]
    table = (root / "sweep.md").read_text(encoding="utf-8").split("\n")
    lines += [line for line in table if line.startswith("|")]
    lines += ["", "## Resume after kill -9", "",
              "| figure | value |", "|---|---|",
              f"| killed with SIGKILL after | {_fmt(killed_at, 4)} s (first run: {first_s:.0f} s) |",
              f"| trials finished before the kill | {len(before)} |",
              f"| of those trained again by the resumed run | {len(retrained)} |",
              f"| resumed run, to the end | {'stopped before the end (--report-only)' if resumed_s is None else f'{resumed_s:.0f} s'} |",
              f"| trials in all: complete / pruned | {len(complete)} / {len(pruned)} |",
              f"| reference (teacher) score, measured once | {_fmt(data.get('reference_score'))} |",
              "", "## What the sweep adds per trial", "",
              "| figure | value |", "|---|---|",
              f"| per trial trained: Optuna's trial time − (train + eval) | median {_fmt(sorted(inside)[len(inside) // 2] if inside else None)} s, max {_fmt(max(inside) if inside else None)} s |",
              f"| train s per complete trial (load, train, merge) | {', '.join(_fmt(r['train_s']) for r in complete)} |",
              f"| eval s per complete trial | {', '.join(_fmt(r['eval_s']) for r in complete)} |",
              f"| train s of pruned trials (steps they ran) | {', '.join(_fmt(r['train_s']) for r in pruned) or '–'} |",
              ""]
    if best:
        lines.append(f"Best: trial {best['trial']} ({', '.join(f'{k}={_fmt(v)}' for k, v in best['params'].items())}), "
                     f"score {_fmt(best['score'])}; best.yaml holds its recipe.")
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
