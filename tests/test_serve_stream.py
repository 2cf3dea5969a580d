"""Streamed answers through the serve router, token by token where the route is known before the answer, driven by
the real openai SDK against loopback fake servers that stream (fakes/streaming.py). Nothing is timed: a fake holds
the rest of its stream until released, and its counters say what it had not sent when the client got a chunk."""
from __future__ import annotations

import time

import openai
import pytest
from helpers import API_KEY
from serving import KEY_ENV, RunningRouter, http, serve_config, student_and_teacher

from factory.served_log import iter_served

ANSWER = "Paris is the capital of France."  # eight 4-character chunks from the fake


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with student_and_teacher(ANSWER) as pair:
        yield pair


def client(router: RunningRouter) -> openai.OpenAI:
    # A router that buffered a held stream would never send a chunk: the read timeout fails the test, not a hang.
    return openai.OpenAI(base_url=router.base_url, api_key="none", max_retries=0, timeout=10)


def open_stream(router: RunningRouter, **options):
    raw = client(router).chat.completions.with_raw_response.create(
        model="apprentice", messages=[{"role": "user", "content": "capital of France?"}], stream=True, **options)
    return raw.headers, raw.parse()


def text_of(chunks: list) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_the_students_chunks_reach_the_client_while_the_backend_still_holds_the_rest(tmp_path, fakes):
    student, teacher = fakes
    student.config.stream_hold_after = 2  # two content chunks, then the fake waits for release_streams()
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          alarm={"confidence_floor": -5.0})  # the student is asked for its logprobs
    with RunningRouter(config) as router:
        headers, stream = open_stream(router, stream_options={"include_usage": True})
        chunks, held, logged_early = [], None, None
        for chunk in stream:
            chunks.append(chunk)
            if held is None and text_of(chunks):
                held = student.stats.snapshot()["stream_chunks_held"]
                logged_early = list(iter_served(tmp_path / "log"))
                student.release_streams()
        whole = client(router).chat.completions.create(
            model="apprentice", messages=[{"role": "user", "content": "capital of France?"}])
    assert held and held > 0, "the first text came through while the backend still had chunks unsent"
    assert logged_early == [], "the record is written once the answer is whole"
    assert text_of(chunks) == ANSWER == whole.choices[0].message.content
    assert headers["x-apprentice-model"] == "student" and headers["x-apprentice-route"] == "student"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ANSWER) // 4
    assert student.stats.bodies[0]["stream"] is True, "the backend was asked to stream"
    streamed, buffered = list(iter_served(tmp_path / "log"))
    assert streamed["completion"] == [{"role": "assistant", "content": ANSWER}] and streamed["fault"] is None
    assert streamed["finish_reason"] == "stop" and streamed["usage"]["output_tokens"] == len(ANSWER) // 4
    assert streamed["confidence"] == pytest.approx(buffered["confidence"]), \
        "the confidence read from the streamed logprobs is the whole answer's"
    assert streamed["id"] == chunks[0].id.removeprefix("chatcmpl-")


def test_a_canary_streams_from_the_teacher_and_the_cascade_waits_for_the_students_whole_answer(tmp_path, fakes):
    student, teacher = fakes
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "cascade", "threshold": -5.0, "canary": 0.5})
    with RunningRouter(config, seed=3) as router:
        routes = []
        for _ in range(6):
            headers, stream = open_stream(router)
            routes.append((headers["x-apprentice-route"], text_of(list(stream))))
    assert ("canary", "Paris.") in routes and ("cascade", ANSWER) not in routes
    assert ("student", ANSWER) in routes, "the student's confident answers"
    canaries = sum(route == "canary" for route, _ in routes)
    assert teacher.stats.streams == canaries, "a canary's answer is streamed from the teacher"
    assert student.stats.streams == 0 and all("stream" not in body for body in student.stats.bodies), \
        "the cascade reads the student's whole answer (its confidence) before anything is sent"


@pytest.mark.parametrize("cut", ["stream_error", "stream_drop"])
def test_a_backend_failing_mid_stream_ends_the_stream_with_an_openai_error_and_is_logged(tmp_path, fakes, cut):
    student, teacher = fakes
    student.config.faults[1] = cut
    student.config.stream_cut_after = 2
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url)
    with RunningRouter(config) as router:
        _, stream = open_stream(router)
        chunks = []
        with pytest.raises(openai.APIError, match="the model's answer broke off"):
            for chunk in stream:
                chunks.append(chunk)
        metrics = http("GET", f"{router.url}/metrics").text
    assert text_of(chunks) == ANSWER[:8], "the two chunks passed on before the failure"
    (record,) = list(iter_served(tmp_path / "log"))
    assert record["completion"] == [{"role": "assistant", "content": ANSWER[:8]}], "what the client got is logged"
    assert record["fault"].startswith("stream_broken: student:") and record["finish_reason"] is None
    assert student.stats.total == 1 and teacher.stats.total == 0, "no retry and no fallback once text is out"
    assert 'apprentice_serve_fallbacks_total{reason="stream_broken"} 1' in metrics
    assert any(w.startswith("stream broken: student:") for w in router.warnings)


def test_a_stream_failing_before_its_first_text_falls_back_to_the_teacher(tmp_path, fakes):
    student, teacher = fakes
    student.config.faults[1] = "stream_error"
    student.config.stream_cut_after = 0  # the error event comes before any text
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url)
    with RunningRouter(config) as router:
        headers, stream = open_stream(router)
        text = text_of(list(stream))
    assert (text, headers["x-apprentice-model"], headers["x-apprentice-fault"]) == ("Paris.", "teacher", "student_down")
    (record,) = list(iter_served(tmp_path / "log"))
    assert record["route"] == "fallback" and "injected stream_error" in record["fault"]


def test_a_backend_that_cannot_stream_answers_whole_and_the_router_chunks_it(tmp_path, fakes):
    student, teacher = fakes
    student.config.stream_hold_after = 1  # would hold a stream forever: this backend must not stream
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url)
    config.student.client = "sdk"  # the SDK path answers whole (can_stream is False), as in-process models do
    with RunningRouter(config) as router:
        _, stream = open_stream(router)
        text = text_of(list(stream))
    assert text == ANSWER and student.stats.streams == 0
    assert next(iter_served(tmp_path / "log"))["completion"][0]["content"] == ANSWER


def test_a_client_that_leaves_mid_stream_does_not_stop_the_answer_being_read_and_logged(tmp_path, fakes):
    student, teacher = fakes
    student.config.stream_hold_after = 1
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url)
    with RunningRouter(config) as router:
        _, stream = open_stream(router)
        for chunk in stream:
            if text_of([chunk]):
                break
        stream.close()  # the client hangs up with the rest of the answer still held by the backend
        student.release_streams()
        # Not a timing: wait (up to 10 s) for the router to read the rest and log it.
        for _ in range(200):
            if list(iter_served(tmp_path / "log")):
                break
            time.sleep(0.05)
    (record,) = list(iter_served(tmp_path / "log"))
    assert record["completion"][0]["content"] == ANSWER and record["fault"] is None, "read to its end and logged"
