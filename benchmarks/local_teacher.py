"""Output tokens/s of `provider: local` (the micro-batching LocalTeacher) against a raw `model.generate` loop.

Question: does the factory's local teacher, driven through the whole pipeline, generate as many tokens per
second as the loop an engineer writes by hand with transformers at the same batch size? (Target: >= 0.95x.)

Both sides run the embedded SmolLM2-135M-Instruct on the CPU, each in its own subprocess, alternating
(raw, factory, raw, factory, ...) so that a drift in machine load hits both:

- raw: load model + tokenizer (`factory.hf.load_model`), then chunks of B prompts in file order:
  chat template, left padding, `model.generate(max_new_tokens=M, do_sample=False)` under
  `torch.inference_mode`, decode.
- factory: `python -m factory generate RECIPE.yaml` on a recipe this script writes (provider local,
  batch_size B, max_concurrency 4B, the default checks, the same prompts file).

Same work on both sides: the same prompts, greedy decoding (temperature 0: no random stream to line up,
and both sides decode the same tokens up to padding effects), the same max_tokens, the same batch size, and
the same torch threads (OMP_NUM_THREADS=T in both environments; each side reports `torch.get_num_threads()`
from the thread that runs generate). Tokens are counted alike: generated tokens up to and including the
end-of-turn token (the local teacher's `usage.output_tokens`, summed by the manifest).

Timed: the generation loop only, model load excluded on both sides. The raw side's timer starts after
`load_model` returns. The factory loads its model lazily, inside its run (manifest `this_run.elapsed_s`), so
the factory subprocess is started through a small wrapper that times the teacher's `load_model` call (and
its `generate_ids` calls, to report how much of the loop is spent outside generate) and then runs the
factory CLI unchanged via runpy; its loop time is elapsed_s minus that load time. Everything else the
pipeline does (queueing, batching, tokenizing, checks, writing records, cache, manifest) is inside it.

The factory groups waiting requests by prompt length; the raw loop takes the file's order, so with
prompts in random order the factory pads less. `--sorted` writes the prompts shortest first, which gives
both sides the same batches and padding and leaves only the factory's own overhead to measure.

    .venv/bin/python benchmarks/local_teacher.py [--prompts 40 --batch-size 8 --max-tokens 64 --rounds 3 \
        --threads 2 --sorted --out benchmarks/results/local_teacher.md]

The vLLM side (`provider: vllm` against raw `vllm.LLM.generate`) needs the vLLM venv on both sides and is
its own script: benchmarks/vllm_teacher.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "local_teacher.md"

TOPICS = ("photosynthesis", "the French Revolution", "binary search", "compound interest", "plate tectonics",
          "the water cycle", "vaccines", "black holes", "supply and demand", "recursion", "the Roman Empire",
          "climate change", "how a bicycle stays upright", "prime numbers", "the immune system", "jazz")
ASKS = ("Explain {t}.", "What is {t}? Answer in two sentences.", "Give three facts about {t}.",
        "Write a short poem about {t}.", "How would you teach {t} to a ten-year-old?",
        "List the main ideas behind {t} and say which one matters most and why.")
CONTEXT = ("I am preparing a lesson for a mixed class and want the explanation to be accurate but simple. "
           "Some of the students already know the basics, others have never heard of the subject, and I "
           "would like an answer that works for both groups without talking down to anyone. ")


# ---- inputs ----------------------------------------------------------------------------------------
def write_prompts(path: Path, count: int, seed: int = 0, by_length: bool = False) -> None:
    """`count` prompts of varied length (about 30 to 200 tokens with the chat template's system turn), in
    random order, or shortest first with `by_length`."""
    # Distinct texts: a repeated prompt would be answered from the run's cache instead of generated.
    combos = list(itertools.product(ASKS, TOPICS, (0, 0, 0, 1, 2, 3)))
    random.Random(seed).shuffle(combos)
    texts: list[str] = []
    for i in range(count):
        ask, topic, context = combos[i % len(combos)]
        text = CONTEXT * context + ask.format(t=topic)
        texts.append(text + f" (question {i})" if text in texts else text)
    if by_length:
        texts.sort(key=len)
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")


def write_recipe(workdir: Path, name: str, prompts: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    run_dir = workdir / f"run-{name}"
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(
        "factory:\n"
        f"  output_dir: {run_dir}\n"
        f"  prompts: {{path: {prompts}}}\n"
        "  teacher:\n"
        "    provider: local\n"
        f"    model: '{MODEL}'\n"
        "    device: cpu\n"
        f"    params: {{temperature: 0, max_tokens: {args.max_tokens}}}\n"
        f"    batch_size: {args.batch_size}\n"
        f"    max_concurrency: {4 * args.batch_size}\n",  # the teacher's own cap (max_useful_concurrency)
        encoding="utf-8",
    )
    return recipe, run_dir


def bench_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> float:
    """Run a subprocess to its end; its wall seconds. Exits with its stderr when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:  # interrupted or terminated: do not leave a child generating on both cores
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return time.perf_counter() - start


# ---- side: raw transformers loop (runs in its own subprocess) -----------------------------------------
def raw_loop(prompts: Path, batch_size: int, max_tokens: int, out: Path) -> None:
    import torch

    from factory.hf import load_model

    model, tokenizer = load_model(MODEL, "cpu")
    configured = model.generation_config.eos_token_id
    eos = {configured} if isinstance(configured, int) else set(configured or ())
    eos.add(tokenizer.eos_token_id)
    conversations = [[{"role": "user", "content": json.loads(line)["prompt"]}]
                     for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokens = calls = padded = 0
    generate_s = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(conversations), batch_size):
            batch = tokenizer.apply_chat_template(conversations[i:i + batch_size], add_generation_prompt=True,
                                                  padding=True, return_tensors="pt", return_dict=True)
            padded += batch["input_ids"].numel()
            began = time.perf_counter()
            output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                    eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
            generate_s += time.perf_counter() - began
            calls += 1
            for row in output[:, batch["input_ids"].shape[1]:].tolist():
                end = next((j for j, tok in enumerate(row) if tok in eos), None)
                kept = row if end is None else row[:end]
                tokens += len(row) if end is None else end + 1
                tokenizer.decode(kept, skip_special_tokens=True)
    loop_s = time.perf_counter() - start
    out.write_text(json.dumps({"tokens": tokens, "loop_s": loop_s, "generate_s": generate_s, "generate_calls": calls,
                               "padded_prompt_tokens": padded, "threads": torch.get_num_threads()}))


def run_raw(workdir: Path, prompts: Path, args: argparse.Namespace, round_no: int) -> dict:
    out = workdir / f"raw-{round_no}.json"
    cmd = [PY, __file__, "_raw", str(prompts), str(args.batch_size), str(args.max_tokens), str(out)]
    wall = run_child(cmd, bench_env(args.threads))
    result = json.loads(out.read_text())
    return {**result, "wall_s": wall, "tok_s": result["tokens"] / result["loop_s"]}


# ---- side: python -m factory generate (runs in its own subprocess) -----------------------------------
def factory_cli(hook_out: Path, argv: list[str]) -> None:
    """`python -m factory ARGV`, with the local teacher's load_model and generate_ids timed (not changed)."""
    import factory.teachers.local as local

    record: dict = {"load_s": 0.0, "generate_s": 0.0, "generate_calls": 0, "padded_prompt_tokens": 0}
    load_model, generate_ids = local.load_model, local.generate_ids

    def timed_load(*a, **k):
        began = time.perf_counter()
        try:
            return load_model(*a, **k)
        finally:
            record["load_s"] += time.perf_counter() - began

    def timed_generate(*a, **k):
        import torch

        record["threads"] = torch.get_num_threads()  # in the teacher's worker thread, where generate runs
        rows = a[2]
        record["padded_prompt_tokens"] += len(rows) * max(map(len, rows))
        began = time.perf_counter()
        try:
            return generate_ids(*a, **k)
        finally:
            record["generate_s"] += time.perf_counter() - began
            record["generate_calls"] += 1

    local.load_model, local.generate_ids = timed_load, timed_generate
    sys.argv = ["factory", *argv]
    try:
        runpy.run_module("factory", run_name="__main__", alter_sys=True)
    finally:
        hook_out.write_text(json.dumps(record))


def run_factory(workdir: Path, prompts: Path, args: argparse.Namespace, round_no: int) -> dict:
    recipe, run_dir = write_recipe(workdir, f"factory-{round_no}", prompts, args)
    hook_out = workdir / f"factory-{round_no}.json"
    wall = run_child([PY, __file__, "_factory", str(hook_out), "generate", str(recipe)], bench_env(args.threads))
    hook = json.loads(hook_out.read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    this_run = manifest["this_run"]
    if this_run["requests"] != args.prompts or manifest["counts"]["failed"]:
        raise SystemExit(f"factory run {run_dir}: {this_run['requests']} requests, {manifest['counts']}")
    loop_s = this_run["elapsed_s"] - hook["load_s"]
    tokens = this_run["output_tokens"]
    return {"tokens": tokens, "loop_s": loop_s, "generate_s": hook["generate_s"], "threads": hook["threads"],
            "load_s": hook["load_s"], "generate_calls": hook["generate_calls"], "wall_s": wall,
            "padded_prompt_tokens": hook["padded_prompt_tokens"],
            "tok_s": tokens / loop_s}


# ---- report ----------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {metadata.version('torch')}, "
            f"transformers {metadata.version('transformers')}, {platform.platform()}")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def report(args: argparse.Namespace, sides: dict[str, list[dict]], load_before: str, load_after: str) -> str:
    raw, fac = sides["raw"], sides["factory"]
    raw_med = statistics.median(r["tok_s"] for r in raw)
    fac_med = statistics.median(r["tok_s"] for r in fac)
    ratio = fac_med / raw_med
    # Each factory round against the raw rounds just before and after it: cancels a steady drift in speed.
    paired = [f["tok_s"] / statistics.mean(r["tok_s"] for r in raw[i:i + 2]) for i, f in enumerate(fac)]
    command = " ".join([".venv/bin/python", "benchmarks/local_teacher.py", *sys.argv[1:]])
    lines = [
        "# local_teacher",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}. Load average (1 min) {load_before} before the rounds, "
        f"{load_after} after (the benchmark's own processes included).",
        "",
        f"Command: `{command}`",
        f"Machine: {machine()}",
        f"Settings: model `{MODEL}` (float32, cpu), {args.prompts} prompts of varied length "
        f"({'sorted shortest first' if args.sorted else 'in random order'}), batch size "
        f"{args.batch_size}, max_tokens {args.max_tokens}, greedy (temperature 0), OMP_NUM_THREADS={args.threads} "
        f"on both sides, {args.rounds} alternating rounds (raw first). Factory: `python -m factory generate`, "
        f"provider local, max_concurrency {4 * args.batch_size}, default checks (empty, truncated, refusal).",
        "Timed: the generation loop; model load excluded on both sides (factory: manifest `this_run.elapsed_s` "
        "minus the timed `load_model` call inside the run). Tokens: generated tokens up to and including the "
        "end-of-turn token, on both sides.",
        "",
        "## provider: local",
        "",
        "| round | side | output tokens | loop s | tokens/s | generate calls | prompt tokens with padding "
        "| loop s outside generate | torch threads | load s | process wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for round_no in range(args.rounds):
        for name, label in (("raw", "raw `model.generate` loop"), ("factory", "`python -m factory generate`")):
            r = sides[name][round_no]
            load = f"{r['load_s']:.1f}" if "load_s" in r else "-"
            lines.append(f"| {round_no + 1} | {label} | {r['tokens']} | {r['loop_s']:.2f} | {r['tok_s']:.1f} | "
                         f"{r['generate_calls']} | {r['padded_prompt_tokens']} | {r['loop_s'] - r['generate_s']:.2f} | "
                         f"{r['threads']} | {load} | {r['wall_s']:.1f} |")
    lines += [
        "",
        "| side | tokens/s (median) | ratio to raw |",
        "|---|---|---|",
        f"| raw `model.generate` loop | {raw_med:.1f} | 1.00 |",
        f"| `python -m factory generate` (provider local) | {fac_med:.1f} | **{ratio:.3f}** |",
        "",
        f"Ratio factory/raw: **{ratio:.3f}** (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}).",
        "",
        f"Paired ratios (each factory round / mean of the raw rounds before and after it): "
        f"{', '.join(f'{x:.3f}' for x in paired)}; median {statistics.median(paired):.3f}.",
        "",
        "\"Loop s outside generate\": the loop's time not spent inside `model.generate` (raw) or the teacher's "
        "`generate_ids` (factory): chat template, padding, decoding and, for the factory, the whole pipeline "
        "(queue, batcher, checks, records, cache, manifest). \"Prompt tokens with padding\": rows x width summed "
        "over the generate calls; the factory groups waiting requests by prompt length, the raw loop takes "
        "the file's order.",
        "",
        "## provider: vllm",
        "",
        "Measured by `benchmarks/vllm_teacher.py` (both sides need the vLLM venv): [vllm_teacher.md](vllm_teacher.md).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("_raw", "_factory"):
        sys.path[0] = str(REPO)  # as under `python -m`: the repository, not benchmarks/, comes first
    if len(sys.argv) > 1 and sys.argv[1] == "_raw":
        raw_loop(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_factory":
        factory_cli(Path(sys.argv[2]), sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating raw, factory, ...")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for both sides")
    parser.add_argument("--sorted", action="store_true",
                        help="prompts file shortest first, so the raw loop's file-order chunks are padded as "
                        "little as the factory's length-grouped batches: isolates the factory's own overhead")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown results file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the child and the temp folder are cleaned up

    # Converted once, outside any timed region and before either side needs it.
    subprocess.run([PY, "-c", f"from factory.builtin import resolve_model; resolve_model({MODEL!r})"],
                   cwd=REPO, env=bench_env(args.threads), check=True)
    sides_fns = {"raw": run_raw, "factory": run_factory}
    sides: dict[str, list[dict]] = {name: [] for name in sides_fns}
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-local-teacher-") as tmp:
        workdir = Path(tmp)
        prompts = workdir / "prompts.jsonl"
        write_prompts(prompts, args.prompts, by_length=args.sorted)
        for round_no in range(args.rounds):
            for name, fn in sides_fns.items():
                result = fn(workdir, prompts, args, round_no)
                sides[name].append(result)
                print(f"round {round_no + 1} {name:8s}: {result['tokens']} tokens in {result['loop_s']:.2f} s = "
                      f"{result['tok_s']:.1f} tokens/s (in generate {result['generate_s']:.2f} s, "
                      f"threads {result['threads']}, load avg {loadavg()})", flush=True)
    text = report(args, sides, load_before, loadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
