"""Teacher logprobs: the recipe key, the sidecar's crash safety, the local teacher's capture (raw logits),
and the OpenAI-compatible path against the fake server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import API_KEY, PYTHON, REPO, build_tiny_llama, read_jsonl, write_prompts, write_recipe

from apprentice.errors import RecipeError
from apprentice.responses import Choice, TeacherResponse
from apprentice.tokens import TokenLogprobs
from factory.__main__ import main as factory_main
from factory.logprobs import (
    JOURNAL,
    SIDECAR,
    LogprobsIndex,
    LogprobsWriter,
    read_logprobs,
    read_meta,
    tokenizer_fingerprint,
)
from factory.recipe import FactoryConfig, load_factory_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def lp(count: int, k: int, *, start: int = 0, strings: bool = False) -> TokenLogprobs:
    """Made-up logprobs of `count` tokens: row i has top ids start+i, start+i+1, …"""
    top = np.log(np.linspace(0.5, 0.05, k, dtype=np.float32))[None].repeat(count, 0)
    out = TokenLogprobs(sampled_logprobs=top[:, 0].copy(), top_logprobs=top)
    if strings:
        out.tokens = [f"t{start + i}" for i in range(count)]
        out.top_tokens = [[f"t{start + i + j}" for j in range(k)] for i in range(count)]
    else:
        out.sampled_ids = np.arange(start, start + count, dtype=np.int32)
        out.top_ids = (np.arange(count)[:, None] + np.arange(k)[None] + start).astype(np.int32)
    return out


META = {"top_k": 4, "token_kind": "ids", "tokenizer": {"name": "t", "vocab_sha256": "ab" * 32, "vocab_size": 9}}


def record_id(i: int) -> str:
    return f"{i:016x}" + "0" * 8  # ids are hashes; the resume index keys on their first 16 hex digits


# ---- the recipe --------------------------------------------------------------------------------------------
def test_logprobs_key_enters_the_fingerprint_only_when_set(tmp_path):
    prompts = {"path": str(tmp_path / "p.jsonl")}
    plain = FactoryConfig(prompts=prompts)
    assert "logprobs" not in plain.fingerprint()
    assert set(plain.fingerprint()) == {"provider", "model", "base_url", "params", "samples_per_prompt", "system",
                                        "checks"}
    with_lp = FactoryConfig(prompts=prompts, teacher={"logprobs": {"top_k": 5, "shard_records": 9}})
    assert with_lp.fingerprint()["logprobs"] == {"top_k": 5, "token_ids": False, "tokenizer": None}
    assert with_lp.fingerprint_hash() != plain.fingerprint_hash()
    other_shards = FactoryConfig(prompts=prompts, teacher={"logprobs": {"top_k": 5, "shard_records": 1}})
    assert other_shards.fingerprint_hash() == with_lp.fingerprint_hash()  # a memory knob, not the data


def test_anthropic_with_logprobs_is_a_recipe_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "factory:\n  prompts: {path: p.jsonl}\n  teacher:\n    provider: anthropic\n    model: claude-haiku-4-5\n"
        "    logprobs: {top_k: 5}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"factory\.teacher: .*Anthropic API returns no token logprobs"):
        load_factory_config(recipe)
    with pytest.raises(RecipeError, match="for provider openai"):
        load_factory_config(recipe, ["factory.teacher.provider=local", "factory.teacher.logprobs.token_ids=true"])
    with pytest.raises(RecipeError, match="at most 20"):
        load_factory_config(recipe, ["factory.teacher.provider=openai", "factory.teacher.logprobs.top_k=21"])


# ---- the sidecar -------------------------------------------------------------------------------------------
def test_cache_round_trip_keeps_logprobs_exactly():
    response = TeacherResponse([Choice("a", "stop", lp(3, 4)), Choice("b", "length", lp(2, 4, strings=True))], 5, 5)
    again = TeacherResponse.from_cache(json.loads(json.dumps(response.to_cache())))
    for before, after in zip(response.choices, again.choices):
        np.testing.assert_array_equal(before.logprobs.top_logprobs, after.logprobs.top_logprobs)
        np.testing.assert_array_equal(before.logprobs.sampled_logprobs, after.logprobs.sampled_logprobs)
    np.testing.assert_array_equal(again.choices[0].logprobs.top_ids, response.choices[0].logprobs.top_ids)
    assert again.choices[1].logprobs.top_tokens == response.choices[1].logprobs.top_tokens
    plain = TeacherResponse([Choice("a", "stop")], 1, 1)
    assert "logprobs" not in plain.to_cache()  # runs without logprobs cache exactly what they did before
    assert TeacherResponse.from_cache(plain.to_cache()).choices[0].logprobs is None


def test_writer_shards_reads_back_and_survives_a_kill(tmp_path):
    writer = LogprobsWriter(tmp_path, META, shard_records=3)
    for i in range(7):
        assert writer.write(record_id(i), lp(i + 1, 4, start=i))
    assert not writer.write(record_id(2), lp(1, 4))  # already stored: skipped, never duplicated
    directory = tmp_path / SIDECAR
    assert len(list(directory.glob("shard-*.arrow"))) == 2  # 6 records in shards, 1 in the journal
    # A kill -9 now: no close(). The journal holds record 6, plus a torn frame of a record whose JSONL line
    # was never written, and a half-written shard.
    with (directory / JOURNAL).open("ab") as journal:
        journal.write(b"LPJ1\x40\x00\x00\x00garbage")
    (directory / "shard-000002.arrow.tmp").write_bytes(b"half a shard")
    index = LogprobsIndex(tmp_path)  # a reader during the crash sees all 7
    assert len(index) == 7

    resumed = LogprobsWriter(tmp_path, META, shard_records=3)
    assert resumed.repaired_bytes == 15 and not list(directory.glob("*.tmp"))
    assert (directory / JOURNAL).stat().st_size == 0  # the journal was folded into a shard
    assert record_id(6) in resumed and not resumed.write(record_id(6), lp(1, 4))
    assert resumed.write(record_id(7), lp(2, 4, start=7))
    resumed.close()

    data = read_logprobs(tmp_path)
    assert sorted(data) == [record_id(i) for i in range(8)]
    for i in range(8):
        assert data[record_id(i)].sampled_ids.tolist() == list(range(i, i + len(data[record_id(i)])))
        assert data[record_id(i)].top_ids.shape == (len(data[record_id(i)]), 4)
    assert read_meta(tmp_path)["top_k"] == 4

    with pytest.raises(Exception, match="another teacher tokenizer"):
        LogprobsWriter(tmp_path, {**META, "tokenizer": {"name": "t", "vocab_sha256": "cd" * 32}})


def test_killed_between_shard_rename_and_journal_truncation_duplicates_nothing(tmp_path):
    writer = LogprobsWriter(tmp_path, META, shard_records=100)
    for i in range(3):
        writer.write(record_id(i), lp(2, 4))
    journal = (tmp_path / SIDECAR / JOURNAL).read_bytes()
    writer.close()  # shard written, journal emptied …
    (tmp_path / SIDECAR / JOURNAL).write_bytes(journal)  # … as if the kill came before the truncation
    LogprobsWriter(tmp_path, META).close()
    index = LogprobsIndex(tmp_path)
    assert len(index) == 3 and len(list((tmp_path / SIDECAR).glob("shard-*.arrow"))) == 1


def test_an_unreadable_shard_is_set_aside(tmp_path):
    writer = LogprobsWriter(tmp_path, META, shard_records=2)
    for i in range(4):
        writer.write(record_id(i), lp(1, 4))
    writer.close()
    (tmp_path / SIDECAR / "shard-000000.arrow").write_bytes(b"not arrow")
    again = LogprobsWriter(tmp_path, META)
    assert again.dropped_shards == ["shard-000000.arrow"] and len(again) == 2
    assert again.write(record_id(9), lp(1, 4))
    again.close()
    assert sorted(read_logprobs(tmp_path)) == [record_id(2), record_id(3), record_id(9)]
    assert (tmp_path / SIDECAR / "shard-000000.arrow.corrupt").is_file()


# ---- the OpenAI-compatible path, against the fake server ----------------------------------------------------
def test_openai_compatible_server_logprobs_as_strings_and_as_ids(tmp_path, server, env_key):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, n=2, extra_teacher="    logprobs: {top_k: 3}\n")
    assert factory_main(["generate", str(recipe)]) == 0
    assert all(b["logprobs"] is True and b["top_logprobs"] == 3 for b in server.stats.bodies)
    meta = read_meta(run)
    assert meta["token_kind"] == "strings" and "no token ids" in meta["note"]
    assert meta["tokenizer"] == {"name": "gpt-4o-mini", "vocab_sha256": None}
    records = read_jsonl(run / "accepted.jsonl")
    data = read_logprobs(run)
    assert sorted(data) == sorted(r["id"] for r in records) and len(data) == 8
    for record in records:
        entry = data[record["id"]]
        assert "".join(entry.tokens) == record["completion"][0]["content"]
        assert entry.sampled_ids is None and entry.top_logprobs.shape == (len(entry.tokens), 3)
        assert [row[0] for row in entry.top_tokens] == entry.tokens
        assert np.all(np.diff(entry.top_logprobs, axis=1) < 0)

    server.reset_stats()  # a second run: everything from disk, nothing asked, nothing written twice
    assert factory_main(["generate", str(recipe)]) == 0
    assert server.stats.total == 0 and len(LogprobsIndex(run)) == 8

    ids_run = tmp_path / "ids-run"
    recipe = write_recipe(tmp_path / "r2.yaml", output_dir=ids_run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, extra_teacher="    logprobs: {top_k: 2, token_ids: true}\n")
    assert factory_main(["generate", str(recipe)]) == 0
    assert all(b.get("return_tokens_as_token_ids") is True for b in list(server.stats.bodies)[-4:])
    entry = next(iter(read_logprobs(ids_run).values()))
    assert entry.sampled_ids.dtype == np.int32 and entry.top_ids.shape == (len(entry), 2)
    assert read_meta(ids_run)["token_kind"] == "ids"


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_keeps_one_entry_per_record(tmp_path, server, env_key):
    server.config.latency_s = 0.05
    prompts = write_prompts(tmp_path / "p.jsonl", 60)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, n=2,
                          extra_teacher="    max_concurrency: 4\n    logprobs: {top_k: 4, shard_records: 5}\n")
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    proc = subprocess.Popen([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    accepted = run / "accepted.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (accepted.exists() and accepted.read_bytes().count(b"\n") >= 30):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_disk = {r["id"] for r in read_jsonl(accepted)} if accepted.exists() else set()
    assert 0 < len(on_disk) < 120, "the run should have been killed midway"
    assert on_disk <= set(LogprobsIndex(run).ids())  # every record on disk has its logprobs on disk

    assert factory_main(["generate", str(recipe)]) == 0
    records = read_jsonl(accepted)
    index = LogprobsIndex(run)
    ids = list(index.ids())
    assert len(records) == 120 and len(ids) == len(set(ids)) == 120
    assert set(ids) == {r["id"] for r in records}
    for record in records[:10]:
        assert "".join(index.get(record["id"]).tokens) == record["completion"][0]["content"]


# ---- the local teacher --------------------------------------------------------------------------------------
def local_recipe(path: Path, run: Path, prompts: Path, model: str | Path, *, temperature: float,
                 max_tokens: int, top_k: int, n: int = 1) -> Path:
    path.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        f"  prompts: {{path: {prompts}}}\n"
        f"  samples_per_prompt: {n}\n"
        "  teacher:\n"
        "    provider: local\n"
        f"    model: {model}\n"
        f"    params: {{temperature: {temperature}, max_tokens: {max_tokens}, seed: 0}}\n"
        "    device: cpu\n"
        f"    logprobs: {{top_k: {top_k}, shard_records: 3}}\n"
        "  checks: []\n",
        encoding="utf-8",
    )
    return path


def test_local_teacher_stores_raw_logit_logprobs_of_every_token(tmp_path, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.hf import encode_chat

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q}) + "\n"
                               for i, q in enumerate(["a b", "c d e", "f"])), encoding="utf-8")
    run = tmp_path / "run"
    recipe = local_recipe(tmp_path / "r.yaml", run, prompts, tiny_llama, temperature=0.9, max_tokens=6, top_k=4, n=2)
    assert factory_main(["generate", str(recipe)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    meta = read_meta(run)
    assert meta["token_kind"] == "ids" and meta["tokenizer"] == tokenizer_fingerprint(tokenizer, str(tiny_llama))
    records = read_jsonl(run / "accepted.jsonl")
    data = read_logprobs(run)
    assert len(records) == 6 and sorted(data) == sorted(r["id"] for r in records)
    for record in records:
        entry = data[record["id"]]
        ids = entry.sampled_ids.tolist()
        assert 0 < len(ids) <= 6
        stop = record["finish_reason"] == "stop"
        assert (ids[-1] == 3) == stop  # the end-of-turn token is kept when the teacher stopped
        assert tokenizer.decode(ids[:-1] if stop else ids, skip_special_tokens=True) == record["completion"][0]["content"]
        assert np.all(np.diff(entry.top_logprobs, axis=1) <= 0)
        # Sampled at temperature 0.9, but stored from the raw logits at temperature 1: recompute them.
        context = encode_chat(tokenizer, record["prompt"])
        with torch.no_grad():
            logits = model(torch.tensor([context + ids])).logits[0, len(context) - 1:-1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        top = expected.topk(4, dim=-1)
        np.testing.assert_allclose(entry.top_logprobs, top.values.numpy(), atol=1e-4)
        np.testing.assert_allclose(entry.sampled_logprobs,
                                   expected.gather(1, torch.tensor(ids)[:, None]).squeeze(1).numpy(), atol=1e-4)


@pytest.mark.slow
def test_embedded_teacher_tokens_re_tokenize_to_the_stored_text(tmp_path):
    """The embedded SmolLM2, greedy: the sampled ids decode to the text, and the text encodes to the ids."""
    from transformers import AutoTokenizer

    from factory.builtin import resolve_model

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "fr", "prompt": "What is the capital of France?"}) + "\n"
                       + json.dumps({"id": "hi", "prompt": "Say hello."}) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    model = "builtin:smollm2-135m-instruct"
    recipe = local_recipe(tmp_path / "r.yaml", run, prompts, model, temperature=0, max_tokens=16, top_k=20)
    assert factory_main(["generate", str(recipe)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    meta = read_meta(run)
    assert meta["tokenizer"]["vocab_size"] == 49152 and len(meta["tokenizer"]["vocab_sha256"]) == 64
    data = read_logprobs(run)
    for record in read_jsonl(run / "accepted.jsonl"):
        entry = data[record["id"]]
        text = record["completion"][0]["content"]
        ids = entry.sampled_ids.tolist()
        content = ids[:-1] if record["finish_reason"] == "stop" else ids
        assert tokenizer.decode(content, skip_special_tokens=True) == text
        assert tokenizer.encode(text, add_special_tokens=False) == content
        np.testing.assert_allclose(entry.sampled_logprobs, entry.top_logprobs[:, 0], atol=1e-5)  # greedy
        assert entry.top_logprobs.shape == (len(ids), 20)


def test_vllm_server_rows_with_the_sampled_token_first_keep_the_k_best():
    """A vLLM server lists the sampled token first and then the k best when the sampled one ranks lower (k + 1
    alternatives); the stored row is the k best, best first, and the sampled logprob is kept apart."""
    from factory.recipe import TeacherConfig
    from factory.teachers.openai import OpenAITeacher

    config = TeacherConfig(provider="openai", model="m", base_url="http://127.0.0.1:9/v1",
                           logprobs={"top_k": 2, "token_ids": True})
    teacher = OpenAITeacher(config)
    entry = {"token": "token_id:7", "logprob": -3.0, "top_logprobs": [
        {"token": "token_id:7", "logprob": -3.0}, {"token": "token_id:1", "logprob": -0.5},
        {"token": "token_id:2", "logprob": -1.0}]}
    answer = {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop",
                           "logprobs": {"content": [entry]}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    lp = teacher.parse(answer).choices[0].logprobs
    assert lp.top_ids.tolist() == [[1, 2]] and lp.top_logprobs.tolist() == [[-0.5, -1.0]]
    assert lp.sampled_ids.tolist() == [7] and lp.sampled_logprobs.tolist() == [-3.0]
