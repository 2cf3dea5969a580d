"""The whole production loop on a CPU with the embedded SmolLM2-135M (the demo's task, data/recipes/demo.yaml):

1. the demo's student: generate, train and eval (eval's cascade curve picks the serving threshold);
2. `python -m serve` with that student and the embedded teacher (with the demo's context) behind it, in cascade;
   the golden prompts through it: the routed share and the quality (json_match), next to eval's curve;
3. "production traffic": seed prompts the student was not trained on, through the same server (served log);
4. the feedback loop once: the served requests the student was unsure of → `factory generate` (the teacher answers
   them) → `sft train` on the demo's samples and those → `eval run` with its gate; and whether the gate passed.

    .venv/bin/python examples/serve_loop.py                                  # 80 prompts x 3 samples
    .venv/bin/python examples/serve_loop.py --train-prompts 40 --samples 1   # smaller: the students learn little

Every stage is the project's own command in a subprocess, on recipes written into `--work` from the demo's; the
seed prompts past `--train-prompts` are the production traffic (the demo has 120).

Run at the demo's sizes (the defaults: 80 prompts x 3 samples) on the project machine, 2026-12-06, 2 cores
shared with other benchmarks (load average 2-4), one torch thread, about 25 minutes in all: the first student
(18 steps on 139 samples) scored 86.7 % [75.8, 93.1] json_match against the teacher's 80.0 % [68.2, 88.2] and
passed the gate (retention 108 %). Eval's cascade said routing 20 % of the golden answers (student confidence
below -0.179) would score 91.7 %; served in cascade at that threshold, the teacher answered 18 % of them and they
scored 91.7 %. 2 of the 40 production prompts fell below it; the teacher's 6 answers to them were all accepted,
the second student trained on the demo's samples and those (19 steps on 147), scored 88.3 % [77.8, 94.2] and
passed the gate again (retention 110.4 %). An earlier run at `--train-prompts 40 --samples 1` (3-4 training
steps) taught the student no JSON: both gates failed there.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.metrics import METRICS  # noqa: E402  (the repository on the path first)


def run(stage: str, *arguments: str) -> int:
    print(f"\n$ python -m {stage} {' '.join(arguments)}", flush=True)
    started = time.time()
    code = subprocess.call([sys.executable, "-m", stage, *arguments, "-q"], cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    print(f"  exit {code}, {time.time() - started:.0f} s", flush=True)
    return code


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pick_threshold(results: Path, most_routed: float) -> tuple[float, dict]:
    """The eval cascade point of best quality that routes at most `most_routed` of the answers."""
    points = [p for p in json.loads(results.read_text(encoding="utf-8"))["cascade"]
              if p["threshold"] is not None and p["routed"] <= most_routed]
    best = max(points, key=lambda p: (p["quality"], -p["routed"]))
    return best["threshold"], best


async def send(base_url: str, prompts: list[dict], concurrency: int = 8) -> list[dict]:
    """Each prompt through the server: the answer and who answered."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(item: dict) -> dict:
        async with gate:
            raw = await client.chat.completions.with_raw_response.create(
                model="apprentice", messages=[{"role": "user", "content": item["prompt"]}], max_tokens=32)
            return {**item, "answer": raw.parse().choices[0].message.content,
                    "answered_by": raw.headers["x-apprentice-model"]}

    answers = await asyncio.gather(*(one(item) for item in prompts))
    await client.close()
    return answers


class Server:
    def __init__(self, recipe: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "serve", str(recipe)], cwd=REPO, text=True,
                                        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = ""
        while "serving" not in line:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise SystemExit("the server exited before it served")
        self.base_url = line.split(" on ", 1)[1].strip()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/serve-loop"))
    parser.add_argument("--train-prompts", type=int, default=80, help="seed prompts the first student is trained on")
    parser.add_argument("--samples", type=int, default=3, help="teacher samples per prompt (the demo's 3)")
    parser.add_argument("--most-routed", type=float, default=0.3, help="share the cascade may send to the teacher")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = yaml.safe_load((REPO / "data" / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    seeds = jsonl(REPO / "data" / "seeds" / "extraction.jsonl")
    golden = jsonl(REPO / "data" / "golden" / "extraction.jsonl")

    # 1. The demo's student, on the first --train-prompts seeds.
    recipe = copy.deepcopy(demo)
    del recipe["serve"]
    recipe["factory"].update(output_dir=str(work / "demo"), samples_per_prompt=args.samples)
    recipe["sft"].update(data=[str(work / "demo")], output_dir=str(work / "sft-1"))
    recipe["eval"].update(output_dir=str(work / "eval-1"), perf_prompts=0, speculative=False)
    teacher_model, _, student_model = recipe["eval"]["models"]
    student_model = {**student_model, "model": str(work / "sft-1" / "merged")}
    recipe["eval"]["models"] = [teacher_model, student_model]
    first = write(work / "loop-1.yaml", recipe)
    if run("factory", "generate", str(first), "--limit", str(args.train_prompts)) != 0:
        return 1
    if not (work / "sft-1" / "merged").is_dir() and run("sft", "train", str(first)) != 0:
        return 1
    gate_1 = run("eval", "run", str(first))
    threshold, point = pick_threshold(work / "eval-1" / "results.json", args.most_routed)
    print(f"eval's cascade: routing {point['routed']:.0%} of the golden answers (student confidence below "
          f"{threshold:.3f}) would score {point['quality']:.1%}; the first student's gate exit code {gate_1}")

    # 2.-3. Serve it in cascade; the golden prompts, then unseen seed prompts as production traffic.
    # The golden prompts are logged apart: what is fed back must not include the golden set eval-2 scores.
    serving = copy.deepcopy(demo["serve"])
    serving["student"]["model"] = str(work / "sft-1" / "merged")
    serving["routing"] = {"mode": "cascade", "threshold": threshold, "shadow": 0.0}
    outcomes = {}
    for name, prompts in (("served-golden", golden), ("served", seeds[args.train_prompts:])):
        serving.update(port=0, log_dir=str(work / name))
        server = Server(write(work / f"{name}.yaml", {"serve": serving}))
        try:
            outcomes[name] = asyncio.run(send(server.base_url, prompts))
        finally:
            server.stop()
    answers, production = outcomes["served-golden"], outcomes["served"]
    routed = sum(a["answered_by"] == "teacher" for a in answers) / len(answers)
    quality = sum(METRICS["json_match"](a["answer"], a["reference"]) for a in answers) / len(answers)
    print(f"served the {len(answers)} golden prompts: the teacher answered {routed:.0%}, json_match {quality:.1%} "
          f"(eval's cascade said {point['routed']:.0%} routed, {point['quality']:.1%}); "
          f"{sum(a['answered_by'] == 'teacher' for a in production)} of {len(production)} production prompts "
          "went to the teacher")

    # 4. The feedback loop: what the student was unsure of, answered by the teacher, trained on, gated.
    feedback = copy.deepcopy(recipe)
    # The served prompts carry no reference: the teacher's answers must be JSON objects (the `json` check).
    feedback["factory"].update(output_dir=str(work / "feedback"), checks=["empty", "truncated", "json"], prompts={
        "served": str(work / "served"), "where": {"confidence_below": threshold}})
    feedback["sft"].update(data=[str(work / "demo"), str(work / "feedback")], output_dir=str(work / "sft-2"))
    feedback["eval"].update(output_dir=str(work / "eval-2"))
    feedback["eval"]["models"] = [teacher_model, {**student_model, "model": str(work / "sft-2" / "merged")}]
    second = write(work / "loop-2.yaml", feedback)
    if run("factory", "generate", str(second)) != 0:
        return 1
    if not (work / "sft-2" / "merged").is_dir() and run("sft", "train", str(second)) != 0:
        return 1
    gate_2 = run("eval", "run", str(second))
    results = json.loads((work / "eval-2" / "results.json").read_text(encoding="utf-8"))
    print(f"\nafter one round of feedback: gate {'passed' if gate_2 == 0 else 'failed'} "
          f"({(results.get('gate') or {}).get('reason')}); reports: {work / 'eval-1' / 'report.md'}, "
          f"{work / 'eval-2' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
