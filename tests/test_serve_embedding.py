"""The learned router's prompt embedding from a sentence-embedding model (routing.embedding: semantic, the
semantic_dup check's all-MiniLM-L6-v2): fitted beside hashed words on the same held-out split, recorded in the
router JSON, loaded once when serving and asked off the event loop; what cannot be loaded is refused at start-up.

The shadow log here has the student wrong on one topic (food), right on another (vehicles), whatever its
confidence; the held-out prompts name foods and vehicles that no fitted prompt names, so hashed words cannot
tell the topics apart there, and an embedding can."""
from __future__ import annotations

import asyncio
import json
import random
import threading

import numpy as np
import openai
import pytest
import torch
from helpers import API_KEY, read_jsonl
from serving import KEY_ENV, RunningRouter, backend, student_and_teacher

from apprentice.errors import ApprenticeError
from factory.served_log import ServedLog, served_files
from serve.__main__ import main as serve_main
from serve.config import ServeConfig
from serve.learned import (
    BASE_FEATURES,
    BATCH,
    HASHED_WORDS,
    LearnedRouter,
    Pair,
    fit,
    held_out,
)

torch.set_num_threads(1)
FOODS = "apple bread cheese soup pasta rice salmon tofu beans eggs butter yogurt honey lettuce carrot garlic".split()
VEHICLES = "car truck bicycle train bus motorcycle tractor scooter airplane helicopter ferry van taxi tram".split()
UNSEEN_FOODS = "noodles dumplings pancakes sushi omelette lasagna porridge".split()
UNSEEN_VEHICLES = "locomotive minivan limousine skateboard submarine canoe".split()
TEMPLATES = ("Tell me about {}.", "What do you know about {}?", "Describe {} briefly.", "Explain {} to a child.")
MINILM_DIMENSIONS = 384


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with student_and_teacher() as pair:
        yield pair


def topic_log(log_dir, comparisons: int = 400) -> None:
    """Shadow comparisons: the teacher disagrees on food, agrees on vehicles; confidence is noise."""
    rng = random.Random(0)
    log = ServedLog(log_dir, rotate_bytes=1 << 22)
    for i in range(comparisons):
        food = rng.random() < 0.4
        kept_out = held_out(Pair(f"r{i}", [], "", 0.0, True))
        words = (UNSEEN_FOODS if food else UNSEEN_VEHICLES) if kept_out else (FOODS if food else VEHICLES)
        prompt = rng.choice(TEMPLATES).format(rng.choice(words))
        log.write({"id": f"r{i}", "prompt": [{"role": "user", "content": prompt}],
                   "completion": [{"role": "assistant", "content": "Paris"}], "answered_by": "student",
                   "student_confidence": rng.uniform(-1.0, 0.0)})
        log.write({"id": f"s{i}", "shadow_of": f"r{i}", "by": "teacher", "agree": not food,
                   "completion": [{"role": "assistant", "content": "Paris."}], "confidence": None})
    log.close()


def recipe(tmp_path, student, teacher, **routing) -> ServeConfig:
    data = {"port": 0, "log_dir": str(tmp_path / "log"),
            "routing": {"mode": "learned", "min_agreement": 0.5, **routing},
            "student": backend(student.openai_base_url, "student"), "teacher": backend(teacher.openai_base_url, "t")}
    (tmp_path / "serve.yaml").write_text(json.dumps({"serve": data}))
    return ServeConfig.model_validate(data)


def write_router(path, embedding, dimensions: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    LearnedRouter([0.0] * (BASE_FEATURES + dimensions), 0.0, embedding).save(path)


def test_a_model_embedding_router_sees_the_topic_of_words_it_was_not_fitted_on_and_hashed_words_do_not(tmp_path):
    topic_log(tmp_path / "log")
    router, report = fit(tmp_path / "log", "semantic")
    assert router.embedding == "semantic" and len(router.weights) == BASE_FEATURES + MINILM_DIMENSIONS
    assert set(report["routers"]) == {"hashed", "semantic"}, "both routers are reported on the same split"
    assert report["learned"] == report["routers"]["semantic"], "the router written is the recipe's"
    wrong = 1 - report["held_out_agreement"]
    step = next(i for i, (share, _) in enumerate(report["confidence"]) if share >= wrong)
    semantic, hashed = report["routers"]["semantic"][step][1], report["routers"]["hashed"][step][1]
    assert semantic >= 0.95, f"routing {wrong:.0%} by the embedding router catches the wrong answers ({semantic})"
    assert hashed < 0.85, f"hashed words of unseen foods cannot ({hashed})"
    assert semantic - hashed > 0.15, report


def test_a_router_fitted_with_the_model_routes_unseen_paraphrases_through_the_sdk(tmp_path, fakes, capsys):
    student, teacher = fakes
    topic_log(tmp_path / "log")
    config = recipe(tmp_path, student, teacher, embedding="semantic")  # writes serve.yaml too
    assert serve_main([str(tmp_path / "serve.yaml"), "--fit-router"]) == 0
    printed = capsys.readouterr().err
    header = next(line for line in printed.splitlines() if "confidence only" in line)
    assert "hashed words" in header and "semantic" in header, printed
    saved = json.loads((tmp_path / "log" / "router.json").read_text())
    assert (saved["embedding"], saved["dimensions"]) == ("semantic", MINILM_DIMENSIONS)
    questions = {"Tell me about ravioli.": "teacher", "What is a good recipe for risotto?": "teacher",
                 "Explain a hovercraft to a child.": "student", "Tell me about a cargo ship.": "student"}

    async def ask_together(base_url: str) -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            model="apprentice", messages=[{"role": "user", "content": text}]) for text in questions))
        await client.close()
        return [reply.headers["x-apprentice-model"] for reply in replies]

    with RunningRouter(config) as router:
        answered_by = asyncio.run(ask_together(router.base_url))
    assert dict(zip(questions, answered_by)) == questions
    assert not router.warnings, router.warnings
    served = [r for path in served_files(tmp_path / "log") for r in read_jsonl(path)
              if "shadow_of" not in r and r["prompt"][0]["content"] in questions]
    assert {r["prompt"][0]["content"]: r["answered_by"] for r in served} == questions


def test_a_router_json_naming_an_embedding_that_cannot_be_loaded_is_refused_at_start_up(tmp_path, fakes):
    student, teacher = fakes
    config = recipe(tmp_path, student, teacher)
    path = config.routing.router
    write_router(path, str(tmp_path / "no-such-model"), MINILM_DIMENSIONS)
    with pytest.raises(ApprenticeError, match=r"routing.embedding .*no-such-model.* cannot be loaded here.*"
                                              r"pip install 'apprentice\[semantic\]'.*--fit-router"):
        with RunningRouter(config):
            pass
    path.write_text(json.dumps({"kind": "logistic", "embedding": 7, "weights": [0.0], "bias": 0.0}))
    with pytest.raises(ApprenticeError, match="serve.routing.router: .*embedding 7 is not the name of one"):
        with RunningRouter(config):
            pass


def test_a_router_json_whose_weights_do_not_fit_the_models_embedding_is_refused(tmp_path, fakes):
    student, teacher = fakes
    config = recipe(tmp_path, student, teacher, embedding="semantic")
    write_router(config.routing.router, "semantic", 10)
    with pytest.raises(ApprenticeError, match="fitted on 10-number embeddings, but 'semantic' gives 384 here; refit"):
        with RunningRouter(config):
            pass


def test_fitting_with_an_embedding_that_cannot_be_loaded_names_the_key_and_the_fix(tmp_path):
    topic_log(tmp_path / "log", comparisons=60)
    with pytest.raises(ApprenticeError, match=r"serve.routing.embedding: .* cannot be loaded here.*"
                                              "routing.embedding: hashed"):
        fit(tmp_path / "log", str(tmp_path / "no-such-model"))


def test_a_router_from_before_the_choice_loads_as_hashed_and_a_recipe_that_differs_is_said(tmp_path, fakes):
    student, teacher = fakes
    config = recipe(tmp_path, student, teacher, embedding="semantic")
    config.routing.router.parent.mkdir(parents=True)
    config.routing.router.write_text(json.dumps({"kind": "logistic", "hashed_words": HASHED_WORDS, "bias": 0.0,
                                                 "weights": [0.0] * (BASE_FEATURES + HASHED_WORDS)}))
    with RunningRouter(config) as router:
        assert router.router.learned.embedding == "hashed"
    said = (f"routing.embedding is semantic, but {config.routing.router} was fitted with hashed: serving with "
            "hashed (--fit-router refits with the recipe's)")
    assert router.warnings == [said]


def test_an_embedding_that_fails_while_serving_serves_the_students_answer_marked(tmp_path, fakes):
    student, teacher = fakes
    config = recipe(tmp_path, student, teacher, embedding="semantic")
    write_router(config.routing.router, "semantic", MINILM_DIMENSIONS)

    def broken(texts):
        raise RuntimeError("out of memory")

    with RunningRouter(config) as router:
        router.router.learned.embedder = broken
        client = openai.OpenAI(base_url=router.base_url, api_key="none", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="apprentice", messages=[{"role": "user", "content": "Tell me about ravioli."}])
    assert (raw.headers["x-apprentice-model"], raw.headers["x-apprentice-fault"]) == ("student", "embedding_failed")
    (record,) = [r for path in served_files(tmp_path / "log") for r in read_jsonl(path)]
    assert record["fault"] == "embedding_failed: RuntimeError: out of memory"


def test_prompts_that_arrive_while_the_model_works_are_embedded_together_off_the_event_loop():
    batches, threads = [], set()

    def embedder(texts):
        batches.append(len(texts))
        threads.add(threading.current_thread().name)
        return np.ones((len(texts), 4), dtype=np.float32)

    router = LearnedRouter([0.0] * (BASE_FEATURES + 4), 0.0, "semantic", embedder)

    async def ask(count: int) -> list[float]:
        return await asyncio.gather(*(router.agreement_served([{"role": "user", "content": f"q{i}"}], "a", -0.5)
                                      for i in range(count)))

    assert asyncio.run(ask(BATCH + 8)) == [0.5] * (BATCH + 8)
    router.close()
    assert batches == [BATCH, 8], "all that waits goes in one batch, up to BATCH prompts"
    assert [name.startswith("prompt-embedding") for name in threads] == [True], threads
