"""`factory.runner: ray`: the prompts in shards by a hash of their id, each shard made by the factory's own run
in a Ray task, merged with the run-wide checks across shards. The fast tests check the pieces without Ray
(the split, the merge, the limiter's share, the recipe); the slow ones run a local Ray (`num_cpus=2`, one
session for the module) against the loopback fake server: the same records as a single-process run, and a
worker and a driver killed mid-run, then the same command."""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import numpy as np
from helpers import API_KEY, PYTHON, REPO, build_tiny_llama, read_jsonl, write_prompts, write_recipe
from rich.console import Console

from apprentice.errors import ApprenticeError, RecipeError
from apprentice.responses import Choice, TeacherResponse
from factory.__main__ import main
from factory.limiter import Limiter
from factory.logprobs import read_logprobs, read_meta
from factory import ray_runner
from factory.ray_runner import _outcome, actor_options, run_on_ray
from factory.recipe import load_factory_config
from factory.records import CheckResult, Sample
from factory.run import Run
from factory.run_report import check_compatible
from factory.shards import merge_shards, merge_sidecars, shard_dir, shard_of, split_prompts
from factory.store import ACCEPTED, REJECTED, write_manifest
from factory.teachers import make_teacher
from quality_checks import build_checks

RAY = "  runner: ray\n  ray: {workers: 2, shards: 3}\n  checks: [empty, exact_dup]\n"


def duplicates(messages: list, index: int, body: dict) -> str:
    """Answers that repeat: prompt i gets the answer of prompt i % 10, so every tenth answer is new."""
    number = int(messages[-1]["content"].split()[-1])
    return f"Answer to question {number % 10}, worked out step by step."


# ---- without Ray -----------------------------------------------------------------------------------------
def test_a_prompt_has_one_shard_whatever_the_process_and_the_split_keeps_every_line(tmp_path):
    # Pinned: blake2b of the id, the same in every process (Python's hash() of a str is salted per process).
    assert [shard_of(f"p{i}", 4) for i in range(8)] == [1, 0, 0, 1, 1, 1, 0, 0]
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    counts = split_prompts(prompts, tmp_path, 3, None)
    assert sum(counts) == 40 and min(counts) > 0, f"every prompt in one shard, every shard used: {counts}"
    lines = prompts.read_text().splitlines()
    for index in range(3):
        shard_lines = (shard_dir(tmp_path, index) / "prompts.jsonl").read_text().splitlines()
        assert shard_lines == [line for line in lines if shard_of(json.loads(line)["id"], 3) == index]
    assert split_prompts(prompts, tmp_path, 3, None, limit=5) == [
        sum(1 for i in range(5) if shard_of(f"p{i}", 3) == index) for index in range(3)]


def _record(number: int, text: str, checks: list[CheckResult]) -> str:
    return Sample(id=f"{number:024x}", prompt=[{"role": "user", "content": f"q{number}"}],
                  completion=[{"role": "assistant", "content": text}], teacher={}, checks=checks,
                  prompt_id=f"p{number}").to_json()


def test_merge_rejects_a_duplicate_of_an_earlier_shard_in_the_check_s_place_and_rewrites_whole_files(tmp_path):
    checks_ok = [CheckResult("empty", True), CheckResult("exact_dup", True), CheckResult("truncated", True)]
    for index, lines in enumerate([[_record(1, "same answer", checks_ok), _record(2, "other", checks_ok)],
                                   [_record(3, "Same answer!", checks_ok), _record(4, "third", checks_ok)]]):
        directory = shard_dir(tmp_path, index)
        directory.mkdir(parents=True)
        # A torn last line, as a worker killed mid-write leaves: not part of the run until its shard runs again.
        (directory / ACCEPTED).write_text("\n".join(lines) + '\n{"id": "torn', encoding="utf-8")
    (tmp_path / ACCEPTED).write_text("stale\n")
    checks = build_checks(["empty", "exact_dup", "truncated"])
    merged = asyncio.run(merge_shards(tmp_path, 2, checks))
    assert (merged.accepted, merged.rejected, merged.across_shards) == (3, 1, 1)
    assert [r["id"][-1] for r in read_jsonl(tmp_path / ACCEPTED)] == ["1", "2", "4"]
    [duplicate] = read_jsonl(tmp_path / REJECTED)
    # As a single-process run records it: the checks up to the failing one, which fails in its place.
    assert [(c["name"], c["passed"]) for c in duplicate["checks"]] == [("empty", True), ("exact_dup", False)]
    assert duplicate["checks"][1]["reason"] == f"exact duplicate of {1:024x}"
    assert duplicate["rejected_by"] == "exact_dup"
    assert dict(merged.rejected_by) == {"exact_dup": 1}
    again = asyncio.run(merge_shards(tmp_path, 2, build_checks(["empty", "exact_dup"])))
    assert (again.accepted, again.rejected) == (3, 1), "a merge is rebuilt from the shards, never appended to"


def test_a_limiter_s_share_scales_the_recipe_caps_and_the_limits_the_headers_report():
    limiter = Limiter(max_concurrency=8, rpm=600, tpm=None, share=0.25)
    assert limiter.buckets["requests"].capacity == 150
    limiter.observe_headers({"x-ratelimit-limit-tokens": "40000", "x-ratelimit-remaining-tokens": "20000"})
    tokens = limiter.buckets["tokens"]
    assert (tokens.capacity, tokens.level) == (10000, 5000), "a quarter of the provider's limit and of what remains"
    alone = Limiter(max_concurrency=8)
    alone.observe_headers({"x-ratelimit-limit-tokens": "40000"})
    assert alone.buckets["tokens"].capacity == 40000


def test_a_limiter_takes_a_larger_share_when_a_worker_is_done():
    limiter = Limiter(max_concurrency=8, rpm=600, tpm=None, share=0.25)
    limiter.set_share(0.5)
    requests = limiter.buckets["requests"]
    assert (requests.capacity, requests.rate, requests.level) == (300, 5, 300)
    limiter.observe_headers({"x-ratelimit-limit-requests": "1000"})
    assert requests.capacity == 300, "the recipe's cap, at the new share, stays a cap"


def _in_flight_then(limiter: Limiter, count: int, during) -> None:
    """`count` requests admitted by the limiter and held in flight (their answers wait) while `during(limiter)` runs."""
    answer = TeacherResponse(choices=[Choice(text="ok", finish_reason="stop")], input_tokens=0, output_tokens=0)

    async def main() -> None:
        release = asyncio.Event()

        async def call() -> TeacherResponse:
            await release.wait()
            return answer

        sent = [asyncio.create_task(limiter.run(call, input_tokens=10, output_tokens=10)) for _ in range(count)]
        while limiter.stats.requests < count:  # sent (admitted by the buckets and the pace), not answered
            await asyncio.sleep(0.001)
        during(limiter)
        release.set()
        await asyncio.gather(*sent)

    asyncio.run(main())


@pytest.mark.parametrize("new_share", [1.0, 0.25])
def test_a_new_share_keeps_the_cost_of_the_requests_in_flight(new_share):
    # 6,000 a minute at a half share: 50 a second, so the 4 sends are spaced 21 ms apart and refill little.
    limiter = Limiter(max_concurrency=8, rpm=6000, share=0.5)
    requests = limiter.buckets["requests"]
    requests.level = 10.0  # most of the window spent: what is in flight matters
    seen = {}

    def change(limiter: Limiter) -> None:
        now = time.monotonic()
        requests.wait_for(0, now)  # the level refilled up to now
        seen["before"] = requests.level
        seen["wait_before"] = limiter.pacer.due["requests"] - now
        limiter.set_share(new_share)
        seen["after"] = requests.level
        seen["wait_after"] = limiter.pacer.due["requests"] - time.monotonic()

    _in_flight_then(limiter, 4, change)
    ratio = new_share / 0.5
    # This worker's part before the 4 in flight was level + 4; that part scales, and the 4 are still owed.
    assert seen["after"] == pytest.approx((seen["before"] + 4) * ratio - 4, abs=0.05), seen
    assert abs(seen["after"] - seen["before"] * ratio) >= 4 * abs(ratio - 1) - 0.05, "not the level alone scaled"
    assert seen["wait_after"] == pytest.approx(seen["wait_before"] / ratio, abs=0.002), "the next send's spacing too"
    assert (requests.capacity, requests.rate) == (6000 * new_share, 100 * new_share)
    assert limiter._in_flight_cost["requests"] == 0, "answered: nothing left in flight"


class _Sleeps:
    """Stands in for a Run: its limiters, and an execute that takes a while."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.limiters = [Limiter(max_concurrency=8, rpm=600, share=0.5)]
        self.endpoint_limiters = {"http://127.0.0.1:9/v1": self.limiters[0]}
        self.seconds = seconds

    async def execute(self) -> str:
        await asyncio.sleep(self.seconds)
        return "complete"


def test_a_worker_follows_the_share_the_driver_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_runner, "SHARE_EVERY_S", 0.05)
    run = _Sleeps()
    ray_runner._write_share(tmp_path, 1)
    assert asyncio.run(ray_runner._run_sharing(run, tmp_path / ray_runner.SHARE)) == "complete"
    assert run.limiters[0].share == 1.0
    assert run.limiters[0].buckets["requests"].capacity == 600


def test_a_worker_whose_shared_folder_fails_for_a_moment_goes_on_sharing(tmp_path, monkeypatch):
    """An OSError from the shared folder (limits.json, pauses.json) skips that round only: the follower keeps
    running, so the next rounds exchange again and a share the driver writes later is still followed."""
    monkeypatch.setattr(ray_runner, "SHARE_EVERY_S", 0.02)
    calls = {"exchange": 0}

    def flaky(run_dir, limiters):
        calls["exchange"] += 1
        if calls["exchange"] <= 3:
            raise OSError(28, "No space left on device")
        return 0

    monkeypatch.setattr(ray_runner, "exchange", flaky)
    run = _Sleeps(seconds=0.6)
    ray_runner._write_share(tmp_path, 2)

    async def scenario() -> str:
        running = asyncio.create_task(ray_runner._run_sharing(run, tmp_path / ray_runner.SHARE))
        await asyncio.sleep(0.2)
        ray_runner._write_share(tmp_path, 1)  # written after the failing rounds
        return await running

    assert asyncio.run(scenario()) == "complete"
    assert calls["exchange"] > 3, "the rounds after the failures exchanged again"
    assert run.limiters[0].share == 1.0


def test_workers_that_share_a_limit_share_its_first_probe(tmp_path, env_key):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=write_prompts(tmp_path / "p.jsonl", 1),
                          provider="openai", base_url="http://127.0.0.1:9/v1")
    config = load_factory_config(recipe)
    teacher = make_teacher(config.teacher)
    try:
        alone = Run(config, console=Console(file=io.StringIO()))._limiter(config.teacher, teacher)
        quarter = Run(config, console=Console(file=io.StringIO()), rate_share=0.25)._limiter(config.teacher, teacher)
    finally:
        asyncio.run(teacher.aclose())
    assert (alone.limit, quarter.limit) == (8, 2), "four workers send 8 before the headers tell the limit, as one does"


def test_a_fleet_s_endpoints_take_the_same_share_as_the_run_s_limiter(tmp_path, env_key):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=write_prompts(tmp_path / "p.jsonl", 1),
                          provider="openai", base_url="[http://127.0.0.1:9/v1, http://127.0.0.1:10/v1]",
                          extra_teacher="    rpm: 600\n")
    fleet = make_teacher(load_factory_config(recipe).teacher, rate_share=0.5)
    try:
        assert [e.limiter.buckets["requests"].capacity for e in fleet.endpoints] == [300, 300]
    finally:
        asyncio.run(fleet.aclose())


def test_the_ray_settings_are_checked_with_the_recipe(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=prompts, provider="openai",
                          base_url="http://127.0.0.1:9/v1", extra=RAY)
    config = load_factory_config(recipe)
    assert (config.ray.workers, config.ray.shard_count) == (2, 3)
    assert config.fingerprint()["shards"] == 3, "the shard count decides where each sample is: fixed for a directory"
    assert "runner" not in load_factory_config(recipe, ["factory.runner=local", "factory.ray=null"]).fingerprint()
    (tmp_path / "run").mkdir()
    write_manifest(tmp_path / "run", {"fingerprint": load_factory_config(recipe, ["factory.runner=local",
                                                                                "factory.ray=null"]).fingerprint()})
    with pytest.raises(RecipeError, match="runner: was None, now 'ray'"):
        check_compatible(tmp_path / "run", config)  # a local run's directory is not resumed on Ray, nor back
    with pytest.raises(RecipeError, match="set factory.runner: ray or remove them"):
        load_factory_config(recipe, ["factory.runner=local"])
    with pytest.raises(RecipeError, match="a Batch API needs no workers"):
        load_factory_config(recipe, ["factory.teacher.mode=batch"])
    with pytest.raises(RecipeError, match="ray.gpus_per_worker is for a teacher loaded in each worker"):
        load_factory_config(recipe, ["factory.ray.gpus_per_worker=1"])


def test_a_teacher_loaded_in_the_process_gets_one_engine_per_worker_with_its_gpus(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=write_prompts(tmp_path / "p.jsonl", 2),
                          provider="vllm", model="Qwen/Qwen2.5-0.5B-Instruct", base_url="null", extra=RAY)
    vllm = load_factory_config(recipe)
    assert vllm.ray.gpus_per_worker == 1, "a vLLM engine takes a GPU unless told"
    assert actor_options(vllm.ray, 3) == {"num_cpus": 1.0, "num_gpus": 1.0, "max_restarts": 3, "max_task_retries": 3}
    tensor_parallel = load_factory_config(recipe, ["factory.ray.gpus_per_worker=2",
                                                   "factory.teacher.engine_args={tensor_parallel_size: 2}"])
    assert actor_options(tensor_parallel.ray, 0)["num_gpus"] == 2
    local = load_factory_config(recipe, ["factory.teacher.provider=local"])
    assert local.ray.gpus_per_worker == 0, "transformers on the CPU unless told"
    with pytest.raises(RecipeError, match="runner: ray takes a prompts file"):
        load_factory_config(recipe, ["factory.teacher.provider=local", "factory.prompts.path=null",
                                     f"factory.prompts.self_instruct={{seeds: {tmp_path / 'p.jsonl'}, count: 4}}"])


def test_without_ray_installed_the_runner_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=write_prompts(tmp_path / "p.jsonl", 2),
                          provider="openai", base_url="http://127.0.0.1:9/v1", extra=RAY)
    with pytest.raises(RecipeError, match=r"pip install 'apprentice\[ray\]'"):
        run_on_ray(load_factory_config(recipe), console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists(), "nothing written"


# ---- on a local Ray -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # Like a cluster's nodes, the workers have the test key in their own environment (ray.pass_keys is off).
    before = os.environ.get("APPRENTICE_TEST_KEY")
    os.environ["APPRENTICE_TEST_KEY"] = API_KEY
    try:
        info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        if before is None:
            del os.environ["APPRENTICE_TEST_KEY"]
        else:
            os.environ["APPRENTICE_TEST_KEY"] = before
    try:
        yield info.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_shard_s_error_names_the_shard_and_a_worker_that_keeps_dying_stops_its_shard(ray_cluster):
    import ray

    def _raises_a_recipe_error() -> None:  # defined here: Ray ships it by value (the workers cannot import tests)
        raise RecipeError("factory.checks.0: no such module")

    def _dies() -> None:
        os._exit(1)

    with pytest.raises(ApprenticeError, match=r"shard 3 \(shards/00003\): factory.checks.0: no such module"):
        _outcome(ray, ray.remote(_raises_a_recipe_error).remote(), 3, 0)
    outcome = _outcome(ray, ray.remote(_dies).options(max_retries=1).remote(), 2, 1)
    assert outcome["status"] == "stopped"
    assert outcome["message"].startswith("shard 2: its worker died 2 time(s)")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _shard_lines(run: Path) -> int:
    return sum(_lines(directory / ACCEPTED) for directory in (run / "shards").glob("0*"))


def _ctrl_c_once_written(recipe: Path, run: Path, lines: int, *, timeout_s: float,
                         env: dict[str, str] | None = None) -> tuple[int, str]:
    """`factory generate` in its own process, sent Ctrl-C once its shards hold `lines` accepted samples:
    its exit code and what it printed on stderr."""
    proc = subprocess.Popen([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout_s
    while _shard_lines(run) < lines and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, err


def _by_id(run: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(run / ACCEPTED) + read_jsonl(run / REJECTED)}


@pytest.mark.slow
@pytest.mark.one_client
def test_a_sharded_run_makes_the_single_process_run_s_records(tmp_path, server, env_key, ray_cluster):
    server.config.responder = duplicates
    prompts = write_prompts(tmp_path / "p.jsonl", 60)
    records = {}
    for runner in ("local", "ray"):
        extra = RAY if runner == "ray" else "  checks: [empty, exact_dup]\n"
        recipe = write_recipe(tmp_path / f"{runner}.yaml", output_dir=tmp_path / runner, prompts=prompts,
                              provider="openai", base_url=server.openai_base_url, extra=extra)
        assert main(["generate", str(recipe)]) == 0
        records[runner] = _by_id(tmp_path / runner)
    local, sharded = records["local"], records["ray"]
    assert sorted(local) == sorted(sharded), "the same record ids"
    for record_id, mine in sharded.items():
        theirs = local[record_id]
        keep = ("prompt", "completion", "teacher", "attributes", "usage", "finish_reason", "prompt_id")
        assert {k: mine[k] for k in keep} == {k: theirs[k] for k in keep}, record_id
    # Which copy of a duplicate is kept depends on the order answers come in; that one of each is kept does not.
    for run in (local, sharded):
        kept = {r["completion"][0]["content"]: r["id"] for r in run.values() if r["rejected_by"] is None}
        assert len(kept) == 10
        for record in run.values():
            if record["rejected_by"] is not None:
                assert record["rejected_by"] == "exact_dup"
                assert [(c["name"], c["passed"]) for c in record["checks"]] == [("empty", True), ("exact_dup", False)]
                assert record["checks"][1]["reason"] == f"exact duplicate of {kept[record['completion'][0]['content']]}"
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["counts"]["rejected_by"] == {"exact_dup": 50}
    assert manifest["ray"]["rejected_across_shards"] > 0, "the test must exercise the merge's dedup"
    assert (tmp_path / "ray" / "shards" / "share").read_text() == "1.0", "the last task running had the whole limit"
    assert server.stats.total == 120, "each run paid each prompt once"
    assert main(["generate", str(tmp_path / "ray.yaml")]) == 0
    assert server.stats.total == 120, "the second run sends nothing"
    assert _by_id(tmp_path / "ray") == sharded


@pytest.mark.slow
@pytest.mark.one_client
def test_the_shards_logprobs_are_gathered_where_the_trainer_reads_them(tmp_path, server, env_key, ray_cluster):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 30),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    logprobs: {top_k: 2}\n", extra="  runner: ray\n  ray: {workers: 2}\n")
    assert main(["generate", str(recipe)]) == 0
    for _ in range(2):  # as every run does: gathered again from the shards, the same
        gathered = read_logprobs(run)
        assert sorted(gathered) == sorted(r["id"] for r in read_jsonl(run / ACCEPTED)), "one entry per record"
        assert len(list((run / "logprobs").glob("shard-*.arrow"))) == 2, "each shard's file, none twice"
        assert merge_sidecars(run, 2) == 2
    record = read_jsonl(run / ACCEPTED)[0]
    assert gathered[record["id"]].tokens, "the arrays of the record"


@pytest.mark.slow
@pytest.mark.one_client
def test_a_worker_killed_mid_run_is_restarted_and_resumes_its_shard(tmp_path, server, env_key, ray_cluster):
    server.config.latency_s = 0.05
    total = 400
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", total),
                          provider="openai", base_url=server.openai_base_url,
                          extra_teacher="    max_concurrency: 8\n", extra="  runner: ray\n  ray: {workers: 2}\n")
    codes = []
    driver = threading.Thread(target=lambda: codes.append(main(["generate", str(recipe)])))
    driver.start()
    lock = shard_dir(run, 0) / "run.lock"
    deadline = time.monotonic() + 60
    while _lines(shard_dir(run, 0) / ACCEPTED) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = int(lock.read_text())
    os.kill(victim, signal.SIGKILL)
    driver.join(120)
    assert codes == [0]
    assert int(lock.read_text()) != victim, "a new worker made the rest of the shard"
    records = read_jsonl(run / ACCEPTED)  # every line parses
    assert sorted(int(r["prompt_id"][1:]) for r in records) == list(range(total)), "every prompt once"
    paid_twice = sum(count - 1 for count in server.stats.answered.values())
    assert paid_twice <= 8, f"re-paid only what was in flight in the killed worker (8 at most): {paid_twice}"


@pytest.mark.slow
@pytest.mark.one_client
def test_kill_9_of_the_driver_then_the_same_command_loses_nothing_and_pays_nothing_twice(
        tmp_path, server, env_key, ray_cluster):
    server.config.latency_s = 0.05
    total = 400
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", total),
                          provider="openai", base_url=server.openai_base_url, extra_teacher="    max_concurrency: 8\n",
                          extra=f"  runner: ray\n  ray: {{workers: 2, address: '{ray_cluster}'}}\n")
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    command = [PYTHON, "-m", "factory", "generate", str(recipe)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _shard_lines(run) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _shard_lines(run)
    assert 100 <= at_kill < total, "the kill must land mid-run"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = read_jsonl(run / ACCEPTED)
    assert sorted(int(r["prompt_id"][1:]) for r in records) == list(range(total)), "every prompt once"
    paid_twice = sum(count - 1 for count in server.stats.answered.values())
    assert paid_twice <= 2 * 8, f"re-paid only what was in flight in the two workers: {paid_twice}"
    # Sent: every prompt once, plus what was in flight at the kill (answered or cut off with the driver).
    assert server.stats.total <= total + 2 * 8, server.stats


@pytest.mark.slow
@pytest.mark.one_client
def test_ctrl_c_stops_the_shards_after_their_requests_in_flight_and_merges_what_they_made(
        tmp_path, server, env_key, ray_cluster):
    server.config.latency_s = 0.05
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 400),
                          provider="openai", base_url=server.openai_base_url, extra_teacher="    max_concurrency: 8\n",
                          extra=f"  runner: ray\n  ray: {{workers: 2, address: '{ray_cluster}'}}\n")
    returncode, err = _ctrl_c_once_written(recipe, run, 60, timeout_s=60,
                                           env=dict(os.environ, APPRENTICE_TEST_KEY=API_KEY))
    assert returncode == 130, err[-2000:]
    assert "stopping: the shards finish the requests in flight" in err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    merged = len(read_jsonl(run / ACCEPTED))
    assert 60 <= merged < 400, "stopped mid-run"
    assert merged == _shard_lines(run), "what the shards made is in the run directory"
    for index in range(2):
        assert json.loads((shard_dir(run, index) / "manifest.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
@pytest.mark.one_client
def test_api_keys_stay_out_of_ray_unless_pass_keys_sends_them(tmp_path, server, ray_cluster, monkeypatch, capsys):
    """The cluster's workers do not have APPRENTICE_DRIVER_KEY: without ray.pass_keys the shards stop at the
    server's 401 naming the unset variable, with it the driver's value goes with the tasks and the run completes."""
    server.config.api_key = "sk-driver-only"
    monkeypatch.setenv("APPRENTICE_DRIVER_KEY", "sk-driver-only")
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    for pass_keys, expected in ((False, 1), (True, 0)):
        run = tmp_path / f"run-{pass_keys}"
        recipe = write_recipe(tmp_path / f"r-{pass_keys}.yaml", output_dir=run, prompts=prompts, provider="openai",
                              base_url=server.openai_base_url,
                              extra=f"  runner: ray\n  ray: {{workers: 2, pass_keys: {str(pass_keys).lower()}}}\n")
        recipe.write_text(recipe.read_text().replace("APPRENTICE_TEST_KEY", "APPRENTICE_DRIVER_KEY"))
        assert main(["generate", str(recipe)]) == expected
        if not pass_keys:
            shown = capsys.readouterr()
            assert "APPRENTICE_DRIVER_KEY is not set" in shown.out + shown.err, (shown.out + shown.err)[-2000:]
            assert "sk-driver-only" not in shown.out + shown.err
            assert server.stats.by_status.get(200, 0) == 0, "nothing answered without the key"
    assert len(read_jsonl(tmp_path / "run-True" / "accepted.jsonl")) == 6


def _local_teacher_recipe(path: Path, run: Path, prompts: Path, model: Path, extra: str) -> Path:
    path.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        f"  prompts: {{path: {prompts}}}\n"
        "  teacher:\n"
        "    provider: local\n"
        f"    model: {model}\n"
        "    params: {temperature: 0, max_tokens: 6}\n"
        "    device: cpu\n"
        "    batch_size: 1\n"  # each answer alone: no padding that could differ between the runners' batches
        "    logprobs: {top_k: 3}\n"
        "  checks: [empty, {name: regex, pattern: 'f f', mode: must_not_match}]\n" + extra, encoding="utf-8")
    return path


def _letter_prompts(path: Path, count: int) -> Path:
    letters = "abcdefghijklmnop"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{letters[i % 16]} {letters[(3 * i + 1) % 16]} "
                                        f"{letters[(i // 16) % 16]}"}) + "\n" for i in range(count)), encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_local_teacher_on_ray_makes_the_single_process_run_s_records_and_logprobs(tmp_path, ray_cluster):
    """`provider: local` under `runner: ray`: one engine per worker (an actor that loads the tiny Llama once and
    runs its shards one after another); greedy, the records and the logprobs sidecar are the local runner's."""
    model = build_tiny_llama(tmp_path / "tiny")
    prompts = _letter_prompts(tmp_path / "p.jsonl", 12)
    runs = {}
    for runner, extra in (("local", ""), ("ray", "  runner: ray\n  ray: {workers: 2, shards: 3}\n")):
        recipe = _local_teacher_recipe(tmp_path / f"{runner}.yaml", tmp_path / runner, prompts, model, extra)
        assert main(["generate", str(recipe)]) == 0, runner
        runs[runner] = tmp_path / runner
    local, sharded = _by_id(runs["local"]), _by_id(runs["ray"])
    assert len(local) == 12 and sorted(local) == sorted(sharded), "the same record ids"
    assert 0 < sum(record["rejected_by"] is None for record in local.values()) < 12, "accepted and rejected records"
    for record_id, record in sharded.items():
        assert record == local[record_id], record_id  # completion, finish_reason, checks, rejected_by: all of it
    assert read_meta(runs["ray"]) == read_meta(runs["local"]), "the sidecar's tokenizer fingerprint"
    ours, theirs = read_logprobs(runs["ray"]), read_logprobs(runs["local"])
    assert sorted(ours) == sorted(theirs) and len(ours) >= 6, "a sidecar entry per record, as the local runner's"
    for record_id, entry in ours.items():
        assert entry.sampled_ids.tolist() == theirs[record_id].sampled_ids.tolist(), record_id
        assert entry.top_ids.tolist() == theirs[record_id].top_ids.tolist(), record_id
        np.testing.assert_allclose(entry.top_logprobs, theirs[record_id].top_logprobs, atol=1e-5)
    # Two engines for three shards: one ran two shards with the teacher it had loaded for the first.
    shards = [json.loads((shard_dir(runs["ray"], index) / "manifest.json").read_text()) for index in range(3)]
    loads = [shard["this_run"]["teacher_load_s"] for shard in shards]
    assert len(set(loads)) == 2, f"the model loaded once per worker, not once per shard: {loads}"
    # A vLLM engine per worker takes a GPU: on this cluster (none) it is refused before any actor waits for ever.
    vllm = load_factory_config(tmp_path / "ray.yaml", ["factory.teacher.provider=vllm", "factory.teacher.device=null",
                                                       f"factory.output_dir={tmp_path / 'vllm'}"])
    with pytest.raises(RecipeError, match=r"gpus_per_worker: 1 for 2 worker\(s\) needs 2 GPU\(s\); the Ray cluster has 0"):
        run_on_ray(vllm, console=Console(file=io.StringIO()))


@pytest.mark.slow
def test_ctrl_c_stops_a_teacher_engine_s_shards_after_their_answers_in_flight(tmp_path, ray_cluster):
    """Ray does not interrupt a running method of an actor: the engine's run reads the cancel flag instead. So
    Ctrl-C stops the shards as it stops a task's: each finishes what it is answering and writes its manifest as
    interrupted, and the driver merges what they made. 3,000 prompts: without the flag the engines go on and
    the driver ends them when its 30 s wait is up, leaving manifests that say running, or complete."""
    model = build_tiny_llama(tmp_path / "tiny")
    total = 3000
    run = tmp_path / "run"
    recipe = _local_teacher_recipe(tmp_path / "r.yaml", run, _letter_prompts(tmp_path / "p.jsonl", total), model,
                                   f"  runner: ray\n  ray: {{workers: 2, address: '{ray_cluster}'}}\n")
    returncode, err = _ctrl_c_once_written(recipe, run, 20, timeout_s=90)
    assert returncode == 130, err[-2000:]
    assert "stopping: the shards finish the requests in flight" in err
    for index in range(2):
        shard = json.loads((shard_dir(run, index) / "manifest.json").read_text())
        assert shard["status"] == "interrupted", f"shard {index} stopped as on Ctrl-C, not ended or run out"
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    records = read_jsonl(run / ACCEPTED) + read_jsonl(run / REJECTED)
    assert 20 <= len(records) < total, "stopped mid-run"
    made = sum(_lines(shard_dir(run, index) / name) for index in range(2) for name in (ACCEPTED, REJECTED))
    assert len(records) == made, "what the shards made is in the run directory"


@pytest.mark.slow
def test_a_killed_teacher_engine_is_restarted_and_resumes_its_shard(tmp_path, ray_cluster):
    model = build_tiny_llama(tmp_path / "tiny")
    total = 30
    run = tmp_path / "run"
    recipe = _local_teacher_recipe(tmp_path / "r.yaml", run, _letter_prompts(tmp_path / "p.jsonl", total), model,
                                   "  runner: ray\n  ray: {workers: 2}\n")
    codes = []
    driver = threading.Thread(target=lambda: codes.append(main(["generate", str(recipe)])))
    driver.start()

    def written() -> int:
        return _lines(shard_dir(run, 0) / ACCEPTED) + _lines(shard_dir(run, 0) / REJECTED)

    deadline = time.monotonic() + 60
    while written() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    lock = shard_dir(run, 0) / "run.lock"
    victim = int(lock.read_text())
    os.kill(victim, signal.SIGKILL)
    at_kill = written()
    driver.join(120)
    assert codes == [0]
    assert int(lock.read_text()) != victim, "a new engine (the actor restarted) made the rest of the shard"
    records = read_jsonl(run / ACCEPTED) + read_jsonl(run / REJECTED)  # every line parses
    assert sorted(int(r["prompt_id"][1:]) for r in records) == list(range(total)), "every prompt once"
    assert at_kill < _lines(shard_dir(run, 0) / ACCEPTED) + _lines(shard_dir(run, 0) / REJECTED), "killed mid-shard"
    assert len(read_logprobs(run)) == total, "the sidecar has every record, those made before the kill too"
