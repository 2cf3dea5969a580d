"""The serve router, driven by the real openai SDK (sync, async, streaming) against backends that are loopback fake
OpenAI servers with no latency: the API and its errors, who may call, the cascade, canary and shadow shares,
the alarm, the faults, the crash-safe served log and the factory reading it back."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import openai
import pytest
import torch
from aiohttp import web
from helpers import API_KEY, PYTHON, REPO, build_tiny_llama, read_jsonl
from serving import KEY_ENV, LoopThread, RunningRouter, backend, http, serve_config, student_and_teacher

from apprentice.config import validate_section
from apprentice.errors import ApprenticeError, RecipeError
from factory.prompt_config import PromptsConfig
from factory.__main__ import main as factory_main
from factory.prompts import PromptError, SourceEnv
from factory.recipe import Price
from factory.served_log import ServedLog, iter_served, served_files
from factory.sources import write_prompts
from serve.__main__ import main as serve_main
from serve.backends import _key_json
from serve.config import ServeConfig, load_serve_config
from serve.learned import fit

torch.set_num_threads(1)
CLIENT_KEY = "sk-client-7f3a9-SECRET"
ADMIN_KEY = "sk-admin-51c2e-SECRET"
HARD = "a hard question"


@pytest.fixture
def fakes(monkeypatch):
    """A student and a teacher, each a fake OpenAI server with its own answers."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with student_and_teacher() as pair:
        yield pair


def ask(client: openai.OpenAI, text: str = "capital of France?", **options):
    raw = client.chat.completions.with_raw_response.create(
        model="apprentice", messages=[{"role": "user", "content": text}], **options)
    return raw.headers, raw.parse()


def sdk(router: RunningRouter, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=router.base_url, api_key=key, max_retries=0)


# ---- the API ---------------------------------------------------------------------------------------------------
def test_sync_sdk_gets_n_choices_with_usage_and_the_answer_is_logged_before_it_returns(tmp_path, fakes):
    student, teacher = fakes
    with RunningRouter(serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url)) as router:
        headers, completion = ask(sdk(router), n=3, max_tokens=16)
        logged = list(iter_served(tmp_path / "log"))
    assert [c.message.content for c in completion.choices] == ["Paris"] * 3, "n choices, each the student's"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens > 0
    assert headers["x-apprentice-model"] == "student", "the header names who answered"
    assert completion.model == "apprentice"
    assert [r["id"] for r in logged] == [completion.id.removeprefix("chatcmpl-")], "one line per request, same id"
    assert logged[0]["prompt"] == [{"role": "user", "content": "capital of France?"}]
    assert logged[0]["completion"] == [{"role": "assistant", "content": "Paris"}] and logged[0]["choices"] == ["Paris"] * 3
    assert student.stats.bodies[-1]["max_tokens"] == 16, "the client's max_tokens reaches the backend"


def test_async_sdk_streams_the_answer_in_openai_chunks_with_usage(tmp_path, fakes):
    student, teacher = fakes

    async def stream(base_url: str) -> list:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
        chunks = [chunk async for chunk in await client.chat.completions.create(
            model="apprentice", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})]
        await client.close()
        return chunks

    with RunningRouter(serve_config(tmp_path / "log", student.openai_base_url)) as router:
        chunks = asyncio.run(stream(router.base_url))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, "include_usage: a last usage chunk"


def test_bad_requests_get_400_in_the_openai_shape_naming_the_parameter(tmp_path, fakes):
    student, _ = fakes
    with RunningRouter(serve_config(tmp_path / "log", student.openai_base_url, max_tokens=100, max_n=4)) as router:
        client = sdk(router)
        with pytest.raises(openai.BadRequestError) as over:
            ask(client, max_tokens=101)
        with pytest.raises(openai.BadRequestError) as many:
            ask(client, n=5)
        with pytest.raises(openai.BadRequestError) as role:
            client.chat.completions.create(model="apprentice", messages=[{"role": "robot", "content": "x"}])
        not_json = http("POST", f"{router.base_url}/chat/completions", content=b"{not json")
        with pytest.raises(openai.BadRequestError) as tools:
            ask(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert over.value.body["param"] == "max_tokens" and "100" in over.value.body["message"]
    assert many.value.body["param"] == "n"
    assert role.value.body["param"] == "messages[0].role"
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    assert tools.value.body["param"] == "tools", "what this server cannot do is refused, not ignored"
    assert student.stats.total == 0, "a refused request reaches no model"
    assert served_files(tmp_path / "log") and not list(iter_served(tmp_path / "log")), "and is not logged"


# ---- who may call ------------------------------------------------------------------------------------------
def test_a_missing_or_wrong_key_gets_401_and_no_key_reaches_the_log_or_the_metrics(tmp_path, fakes, monkeypatch):
    student, _ = fakes
    monkeypatch.setenv("SERVE_KEYS", f"sk-other, {CLIENT_KEY}")
    monkeypatch.setenv("SERVE_ADMIN_KEY", ADMIN_KEY)
    config = serve_config(tmp_path / "log", student.openai_base_url, api_keys_env="SERVE_KEYS",
                          admin_key_env="SERVE_ADMIN_KEY")
    with RunningRouter(config) as router:
        with pytest.raises(openai.AuthenticationError) as wrong:
            ask(sdk(router, "sk-wrong"))
        missing = http("POST", f"{router.base_url}/chat/completions", json_body={"model": "x", "messages": []})
        headers, completion = ask(sdk(router, CLIENT_KEY))
        admin_with_client_key = http("POST", f"{router.url}/admin/reload",
                                           headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        metrics = http("GET", f"{router.url}/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).text
        metrics_without_key = http("GET", f"{router.url}/metrics")
    assert wrong.value.body["code"] == "invalid_api_key" and "sk-wrong" not in wrong.value.body["message"]
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
    assert completion.choices[0].message.content == "Paris", "the second key of the list is accepted"
    assert admin_with_client_key.status_code == 401, "/admin/* needs its own key"
    assert metrics_without_key.status_code == 401
    logged = "".join(path.read_text(encoding="utf-8") for path in served_files(tmp_path / "log"))
    for secret in (CLIENT_KEY, ADMIN_KEY, "sk-wrong"):
        assert secret not in logged and secret not in metrics, f"{secret} leaked"
    assert 'apprentice_serve_errors_total{status="401"} 3' in metrics, "wrong, missing, admin with a client key"


def test_a_body_over_the_limit_gets_413(tmp_path, fakes):
    student, _ = fakes
    with RunningRouter(serve_config(tmp_path / "log", student.openai_base_url, max_body_bytes=2048)) as router:
        with pytest.raises(openai.APIStatusError) as big:
            ask(sdk(router), "x" * 4096)
        headers, small = ask(sdk(router), "x" * 100)
    assert big.value.status_code == 413 and big.value.body["code"] == "request_too_large"
    assert small.choices[0].message.content == "Paris"


def test_keys_named_but_not_set_stop_the_server_before_it_binds(tmp_path, fakes, monkeypatch):
    student, _ = fakes
    monkeypatch.delenv("SERVE_KEYS", raising=False)
    with pytest.raises(RecipeError, match=r"serve.api_keys_env: \$SERVE_KEYS is not set"):
        RunningRouter(serve_config(tmp_path / "log", student.openai_base_url, api_keys_env="SERVE_KEYS"))


# ---- routing -------------------------------------------------------------------------------------------------
def test_the_cascade_sends_what_the_student_is_unsure_of_to_the_teacher(tmp_path, fakes):
    """The fake's token logprobs fall along the answer (-0.05, -0.15, … per 4-character token): a one-token answer
    has confidence -0.05, a 20-character one -0.25."""
    student, teacher = fakes
    student.config.responder = lambda messages, i, body: "x" * 20 if HARD in messages[-1]["content"] else "Rome"
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "cascade", "threshold": -0.2})
    with RunningRouter(config) as router:
        easy_headers, easy = ask(sdk(router), "an easy question")
        hard_headers, hard = ask(sdk(router), HARD)
    assert (easy_headers["x-apprentice-model"], easy.choices[0].message.content) == ("student", "Rome")
    assert (hard_headers["x-apprentice-model"], hard.choices[0].message.content) == ("teacher", "Paris.")
    assert hard_headers["x-apprentice-route"] == "cascade"
    easy_line, hard_line = iter_served(tmp_path / "log")
    assert easy_line["student_confidence"] == pytest.approx(-0.05)
    assert hard_line["student_confidence"] == pytest.approx(-0.25) and hard_line["answered_by"] == "teacher"
    assert student.stats.bodies[-1]["logprobs"] is True, "the cascade asks the student for its logprobs"


@pytest.mark.slow
def test_a_local_student_answers_with_its_own_confidence_and_the_cascade_routes_on_it(tmp_path, fakes):
    """A tiny random Llama in this process as the student: its confidence is the eval's measure over its own
    token logprobs; the same greedy answer is kept under a threshold below it and routed above it."""
    _, teacher = fakes
    tiny = build_tiny_llama(tmp_path / "tiny")
    student = {"provider": "local", "model": str(tiny), "device": "cpu",
               "params": {"temperature": 0.0, "max_tokens": 4, "seed": 0}}
    config = serve_config(tmp_path / "log", teacher.openai_base_url, teacher.openai_base_url, student=student,
                          routing={"mode": "cascade", "threshold": -1000.0})
    with RunningRouter(config) as router:
        kept_headers, kept = ask(sdk(router), "a b c")
        confidence = next(iter_served(tmp_path / "log"))["student_confidence"]
        router.router.routing = router.router.routing.model_copy(update={"threshold": confidence / 2})
        routed_headers, routed = ask(sdk(router), "a b c")
    assert kept_headers["x-apprentice-model"] == "student" and kept.choices[0].message.content
    assert confidence < 0, "a mean token logprob"
    assert (routed_headers["x-apprentice-model"], routed.choices[0].message.content) == ("teacher", "Paris.")


def test_canary_and_shadow_shares_hold_over_a_thousand_requests(tmp_path, fakes):
    student, teacher = fakes
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "student", "canary": 0.1, "shadow": 0.2})

    async def burst(base_url: str) -> Counter:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> str:
            async with gate:
                raw = await client.chat.completions.with_raw_response.create(
                    model="apprentice", messages=[{"role": "user", "content": f"q{i}"}])
                return raw.headers["x-apprentice-model"]

        answered = Counter(await asyncio.gather(*(one(i) for i in range(1000))))
        await client.close()
        return answered

    with RunningRouter(config, seed=7) as router:
        answered = asyncio.run(burst(router.base_url))
        router.call(router.router.drain())
    lines = list(iter_served(tmp_path / "log"))
    shadows = [line for line in lines if "shadow_of" in line]
    assert answered["teacher"] / 1000 == pytest.approx(0.1, abs=0.03), f"canary share: {answered}"
    assert len(shadows) / 1000 == pytest.approx(0.2, abs=0.04), f"shadow share: {len(shadows)}"
    assert len(lines) - len(shadows) == 1000, "every request logged once"
    assert all(line["agree"] for line in shadows), "'Paris' and 'Paris.' agree after fold_answer"
    by_id = {line["id"]: line for line in lines}
    assert all(line["by"] != by_id[line["shadow_of"]]["answered_by"] for line in shadows), \
        "the shadow asks the model that did not answer"


def test_the_alarm_fires_when_the_student_starts_answering_wrongly(tmp_path, fakes):
    student, teacher = fakes
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "student", "shadow": 1.0},
                          alarm={"agreement_floor": 0.8, "window": 10, "min_samples": 10})
    with RunningRouter(config) as router:
        hook, received = router.call(webhook_receiver())
        config.alarm.webhook = hook
        client = sdk(router)
        for i in range(10):
            ask(client, f"q{i}")
        router.call(router.router.drain())
        healthy = http("GET", f"{router.url}/health")
        student.config.responder = lambda messages, i, body: "Lyon"
        for i in range(5):
            ask(client, f"q{i}")
        router.call(router.router.drain())
        alarmed = http("GET", f"{router.url}/health")
        metrics = http("GET", f"{router.url}/metrics").text
        router.call(router.app.stop())  # the webhook's post is waited for
    assert healthy.status_code == 200 and healthy.json()["rolling_agreement"] == 1.0
    assert alarmed.status_code == 503, "5 wrong answers in the last 10: agreement 0.5 < 0.8"
    assert alarmed.json()["rolling_agreement"] == 0.5 and "agreement" in alarmed.json()["alarms"][0]
    assert 'apprentice_serve_alarm{kind="agreement"} 1' in metrics
    assert any(w.startswith("ALARM: rolling agreement 0.") for w in router.warnings), "a log line says it"
    assert [(r["alarm"], r["on"]) for r in received] == [("agreement", True)], "and the webhook is told"


def test_a_webhook_that_cannot_be_reached_is_a_log_line(tmp_path, fakes):
    student, _ = fakes
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    config = serve_config(tmp_path / "log", student.openai_base_url,
                          alarm={"confidence_floor": -1.0, "webhook": f"http://127.0.0.1:{port}/hook"})

    async def ring(app) -> None:
        app._alarm("confidence", "rolling confidence -2.000 is below the floor -1.0", True)
        await asyncio.gather(*app._background)

    with RunningRouter(config) as router:
        router.call(ring(router.app))
    assert any(w.startswith(f"alarm webhook: http://127.0.0.1:{port}/hook: ClientConnectorError") for w in
               router.warnings), router.warnings


async def webhook_receiver() -> tuple[str, list]:
    """A loopback endpoint that keeps what is posted to it (it lives as long as the router's loop)."""
    received: list = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response()

    application = web.Application()
    application.router.add_post("/hook", hook)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received


def test_a_learned_router_fitted_on_the_shadow_log_beats_confidence_and_routes_with_it(tmp_path, fakes, capsys):
    """Shadow comparisons where the student is wrong on one topic whatever its confidence: the classifier learns the
    topic from the prompt's words, confidence alone cannot."""
    student, teacher = fakes
    rng = random.Random(0)
    log = ServedLog(tmp_path / "log", rotate_bytes=1 << 22)
    for i in range(400):
        topic = rng.choice(["arithmetic", "geography"])
        log.write({"id": f"r{i}", "prompt": [{"role": "user", "content": f"a {topic} question, number {i}"}],
                   "completion": [{"role": "assistant", "content": "Paris"}], "answered_by": "student",
                   "student_confidence": rng.uniform(-1.0, 0.0)})
        log.write({"id": f"s{i}", "shadow_of": f"r{i}", "by": "teacher", "agree": topic == "geography",
                   "completion": [{"role": "assistant", "content": "Paris."}], "confidence": None})
    log.close()
    _, report = fit(tmp_path / "log")
    wrong = 1 - report["held_out_agreement"]  # the held-out share on the topic the student gets wrong
    step = next(i for i, (share, _) in enumerate(report["learned"]) if share >= wrong)
    assert report["learned"][step][1] == 1.0, "routing that share by the learned router catches every wrong answer"
    assert report["confidence"][step][1] < 0.85, "by confidence alone it cannot"
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(json.dumps({"serve": {
        "port": 0, "log_dir": str(tmp_path / "log"), "routing": {"mode": "learned", "min_agreement": 0.5},
        "student": backend(student.openai_base_url, "student"), "teacher": backend(teacher.openai_base_url, "t")}}))
    assert serve_main([str(recipe), "--fit-router"]) == 0
    assert "confidence only" in capsys.readouterr().err and (tmp_path / "log" / "router.json").is_file()
    config = ServeConfig.model_validate(json.loads(recipe.read_text())["serve"])
    with RunningRouter(config) as router:
        hard = ask(sdk(router), "an arithmetic question, number 1000")[0]["x-apprentice-model"]
        easy = ask(sdk(router), "a geography question, number 1000")[0]["x-apprentice-model"]
    assert (hard, easy) == ("teacher", "student")


def test_a_learned_router_needs_enough_comparisons_and_a_file(tmp_path, fakes):
    student, teacher = fakes
    with pytest.raises(ApprenticeError, match="needs at least 20 to fit"):
        fit(tmp_path)
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "learned"})
    with pytest.raises(ApprenticeError, match="--fit-router"):
        with RunningRouter(config):
            pass


# ---- faults ----------------------------------------------------------------------------------------------------
def test_teacher_down_serves_the_student_marked_student_down_the_teacher_both_down_503(tmp_path, fakes):
    student, teacher = fakes
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "student", "canary": 1.0})
    with RunningRouter(config) as router:
        client = sdk(router)
        teacher.config.fault_rates = {"500": 1.0}
        marked_headers, marked = ask(client)
        teacher.config.fault_rates = {}
        student.config.fault_rates = {"503": 1.0}
        router.router.routing = router.router.routing.model_copy(update={"canary": 0.0})
        fallback_headers, fallback = ask(client)
        teacher.config.fault_rates = {"500": 1.0}
        with pytest.raises(openai.APIStatusError) as both:
            ask(client)
        metrics = http("GET", f"{router.url}/metrics").text
    assert (marked_headers["x-apprentice-model"], marked_headers["x-apprentice-fault"]) == ("student", "teacher_down")
    assert marked.choices[0].message.content == "Paris"
    assert (fallback_headers["x-apprentice-model"], fallback_headers["x-apprentice-fault"]) == ("teacher", "student_down")
    assert fallback.choices[0].message.content == "Paris."
    assert both.value.status_code == 503 and both.value.body["code"] == "models_down"
    assert "injected" not in both.value.body["message"], "the backends' errors are not the client's business"
    assert any(w.startswith("503: both models are down") for w in router.warnings), "the operator sees why"
    faults = [line["fault"].split(":")[0] for line in iter_served(tmp_path / "log")]
    assert faults == ["teacher_down", "student_down"], "answers served despite a fault are marked in the log"
    assert 'apprentice_serve_fallbacks_total{reason="teacher_down"} 1' in metrics
    assert 'apprentice_serve_errors_total{status="503"} 1' in metrics


def test_a_spent_teacher_budget_serves_the_student_marked(tmp_path, fakes):
    student, teacher = fakes
    config = serve_config(tmp_path / "log", student.openai_base_url, teacher.openai_base_url,
                          routing={"mode": "teacher"}, budget_usd=0.0)
    config.teacher.price = Price(input=1.0, output=1.0)  # a budget needs a price
    with RunningRouter(config) as router:
        headers, completion = ask(sdk(router))
    assert (headers["x-apprentice-model"], headers["x-apprentice-fault"]) == ("student", "teacher_down")
    assert teacher.stats.total == 0, "nothing is sent past the budget"
    assert "BudgetExhausted" in next(iter_served(tmp_path / "log"))["fault"]


# ---- the served log --------------------------------------------------------------------------------------------
def test_the_log_rotates_by_size_and_a_torn_last_line_is_cut_on_the_next_start(tmp_path):
    log = ServedLog(tmp_path, rotate_bytes=1024)
    for i in range(30):
        log.write({"id": str(i), "prompt": [{"role": "user", "content": "x" * 100}]})
    log.close()
    files = served_files(tmp_path)
    assert len(files) >= 3 and all(path.stat().st_size < 1024 + 200 for path in files)
    with files[-1].open("ab") as handle:
        handle.write(b'{"id": "torn", "pro')
    again = ServedLog(tmp_path, rotate_bytes=1024)
    again.close()
    assert again.repaired == len(b'{"id": "torn", "pro')
    assert [record["id"] for record in iter_served(tmp_path)] == [str(i) for i in range(30)]


def test_kill_9_loses_no_request_that_got_an_answer(tmp_path, fakes):
    student, _ = fakes
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(json.dumps({"serve": {
        "port": 0, "log_dir": str(tmp_path / "log"), "routing": {"mode": "student"},
        "student": backend(student.openai_base_url, "student")}}), encoding="utf-8")
    process = subprocess.Popen([PYTHON, "-m", "serve", str(recipe)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server exited before it served"
        base_url = line.split(" on ", 1)[1].strip()
        answered: list[str] = []
        failed = threading.Event()

        def hammer() -> None:
            client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=5)
            while not failed.is_set():
                try:
                    answered.append(ask(client)[1].id.removeprefix("chatcmpl-"))
                except openai.APIError:
                    failed.set()

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        while len(answered) < 40:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(10)
    finally:
        process.kill()
        process.wait()
    logged = {record["id"] for record in iter_served(tmp_path / "log")}
    assert len(answered) >= 40
    assert set(answered) <= logged, f"answered but not logged: {set(answered) - logged}"


# ---- admin -----------------------------------------------------------------------------------------------------
def test_admin_reload_swaps_the_student_without_a_restart_and_keeps_the_old_one_when_the_new_fails(
        tmp_path, fakes, monkeypatch):
    student, _ = fakes
    student.config.responder = lambda messages, i, body: f"I am {body['model']}"
    monkeypatch.setenv("SERVE_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    config = serve_config(tmp_path / "log", student.openai_base_url, admin_key_env="SERVE_ADMIN_KEY")
    with RunningRouter(config) as router:
        client = sdk(router)
        before = ask(client)[1].choices[0].message.content
        reloaded = http("POST", f"{router.url}/admin/reload", headers=admin, json_body={"model": "student-v2"})
        after = ask(client)[1].choices[0].message.content
        student.config.fault_rates = {"500": 1.0}
        refused = http("POST", f"{router.url}/admin/reload", headers=admin, json_body={"model": "student-v3"})
        student.config.fault_rates = {}
        still = ask(client)[1].choices[0].message.content
        garbled = http("POST", f"{router.url}/admin/reload", headers=admin, content=b"{model")
        not_a_name = http("POST", f"{router.url}/admin/reload", headers=admin, json_body={"model": 3})
    assert (garbled.status_code, not_a_name.status_code) == (400, 400)
    assert not_a_name.json()["error"]["param"] == "model"
    assert (before, reloaded.status_code, after) == ("I am student", 200, "I am student-v2")
    assert refused.status_code == 500 and refused.json()["error"]["code"] == "reload_failed"
    assert still == "I am student-v2", "a student that fails to load is not swapped in"


def test_reload_loads_a_lora_adapter_into_a_vllm_served_student_first(tmp_path, fakes, monkeypatch):
    """A loopback stand-in for vLLM with --enable-lora: `POST /v1/load_lora_adapter` makes a new model name, which
    chat completions then answer as."""
    monkeypatch.setenv("SERVE_ADMIN_KEY", ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with LoopThread() as vllm:
        url, loaded, keys = vllm.call(vllm_stand_in())
        with RunningRouter(serve_config(tmp_path / "log", url, admin_key_env="SERVE_ADMIN_KEY")) as router:
            before = ask(sdk(router))[1].choices[0].message.content
            reloaded = http("POST", f"{router.url}/admin/reload", headers=admin,
                            json_body={"model": "student-v2", "lora_path": "/runs/sft-2/adapter"})
            after = ask(sdk(router))[1].choices[0].message.content
            missing = http("POST", f"{router.url}/admin/reload", headers=admin,
                           json_body={"model": "student-v3", "lora_path": "/nowhere"})
            no_name = http("POST", f"{router.url}/admin/reload", headers=admin, json_body={"lora_path": "/x"})
    assert reloaded.status_code == 200, reloaded.text
    assert (before, after) == ("student answers", "student-v2 answers")
    assert loaded == [{"lora_name": "student-v2", "lora_path": "/runs/sft-2/adapter"}]
    assert keys[0] == f"Bearer {API_KEY}", "vLLM's --api-key is the student's key"
    assert missing.status_code == 500 and "No adapter found at /nowhere" in missing.json()["error"]["message"]
    assert no_name.status_code == 400 and no_name.json()["error"]["param"] == "lora_path"


async def vllm_stand_in() -> tuple[str, list, list]:
    """The two endpoints of a vLLM server with --enable-lora that the reload uses; what was loaded, and the keys."""
    loaded: list = []
    keys: list = []

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        keys.append(request.headers.get("Authorization"))
        if body["lora_path"] == "/nowhere":
            return web.json_response({"error": {"message": "No adapter found at /nowhere"}}, status=400)
        loaded.append(body)
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant", "content": f"{body['model']} answers"}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

    application = web.Application()
    application.router.add_post("/v1/load_lora_adapter", load)
    application.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}/v1", loaded, keys


def test_admin_is_off_without_its_key(tmp_path, fakes):
    student, _ = fakes
    with RunningRouter(serve_config(tmp_path / "log", student.openai_base_url)) as router:
        off = http("POST", f"{router.url}/admin/reload", headers={"Authorization": "Bearer anything"})
    assert off.status_code == 403 and off.json()["error"]["code"] == "admin_off"


def test_a_log_that_cannot_be_written_answers_500_and_nothing_unlogged(tmp_path, fakes):
    student, _ = fakes

    def full(record: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "served-000001.jsonl")

    with RunningRouter(serve_config(tmp_path / "log", student.openai_base_url)) as router:
        router.router.log.write = full
        with pytest.raises(openai.InternalServerError) as refused:
            ask(sdk(router))
    assert refused.value.body["code"] == "log_failed"
    assert any("No space left" in warning for warning in router.warnings)


def test_a_port_in_use_is_one_line_naming_the_key(tmp_path, fakes, capsys):
    student, _ = fakes
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(json.dumps({"serve": {"port": taken.getsockname()[1], "log_dir": str(tmp_path / "log"),
                                            "routing": {"mode": "student"},
                                            "student": backend(student.openai_base_url, "student")}}))
    try:
        assert serve_main([str(recipe)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "serve.port" in err and "--set serve.port=0" in err and "Traceback" not in err


# ---- the config and the feedback loop -----------------------------------------------------------------------
@pytest.mark.parametrize("section,message", [
    ({"routing": {"mode": "cascade"}}, "routing.threshold"),
    ({"routing": {"mode": "student", "canary": 0.1}}, "needs a teacher"),
    ({"routing": {"mode": "student"}, "hots": "x"}, "did you mean `host`"),
    ({"routing": {"mode": "cascade", "threshold": -1}, "teacher": {"provider": "local"},
      "student": {"provider": "anthropic", "model": "claude-haiku-4-5"}}, "no token logprobs"),
])
def test_a_serve_section_that_cannot_route_is_refused_with_its_key(section, message):
    with pytest.raises(RecipeError, match=message):
        validate_section(ServeConfig, "serve", {"student": {"provider": "local"}, **section})  # section's own wins


def test_the_demo_recipe_serves_its_trained_student_with_its_teacher_behind_it():
    config = load_serve_config(REPO / "data" / "recipes" / "demo.yaml")
    assert (config.student.model, config.teacher.model) == ("runs/sft-demo/merged", "builtin:smollm2-135m-instruct")
    assert config.teacher.context and config.student.logprobs is not None, "the teacher keeps the demo's context"


def test_factory_generate_takes_the_served_prompts_the_student_found_hard(tmp_path, fakes):
    _, teacher = fakes
    log = ServedLog(tmp_path / "log", rotate_bytes=1 << 20)
    rows = [("q1", "student", -0.9), ("q2", "student", -0.1), ("q1", "student", -0.8), ("q3", "teacher", -0.95)]
    for i, (text, by, confidence) in enumerate(rows):
        log.write({"id": f"r{i}", "prompt": [{"role": "user", "content": text}], "answered_by": by,
                   "student_confidence": confidence})
    log.write({"id": "s0", "shadow_of": "r0", "by": "teacher"})
    log.close()
    recipe = tmp_path / "feedback.yaml"
    recipe.write_text(json.dumps({"factory": {
        "output_dir": str(tmp_path / "run"), "checks": [],
        "prompts": {"served": str(tmp_path / "log"), "where": {"answered_by": "student", "confidence_below": -0.5}},
        "teacher": backend(teacher.openai_base_url, "teacher")}}), encoding="utf-8")
    assert factory_main(["generate", str(recipe), "-q"]) == 0
    accepted = read_jsonl(tmp_path / "run" / "accepted.jsonl")
    assert [record["prompt"][-1]["content"] for record in accepted] == ["q1"], "hard, the student's, once"
    assert accepted[0]["completion"][0]["content"] == "Paris."
    assert accepted[0]["attributes"]["served_id"] == "r0"
    with pytest.raises(ValueError, match="add served"):
        PromptsConfig.model_validate({"path": "p.jsonl", "where": {"answered_by": "student"}})


def test_a_served_source_with_nothing_to_read_says_where_it_looked(tmp_path):
    prompts = PromptsConfig.model_validate({"served": str(tmp_path / "log")})
    with pytest.raises(PromptError, match="no served log in"):
        asyncio.run(write_prompts(prompts, SourceEnv(tmp_path / "run", console=None)))  # type: ignore[arg-type]
    log = ServedLog(tmp_path / "log", rotate_bytes=1 << 20)
    log.write({"id": "r0", "prompt": [{"role": "user", "content": "q"}], "answered_by": "teacher"})
    log.close()
    strict = PromptsConfig.model_validate({"served": str(tmp_path / "log"), "where": {"answered_by": "student"}})
    with pytest.raises(PromptError, match="none of the 1 served requests"):
        asyncio.run(write_prompts(strict, SourceEnv(tmp_path / "run", console=None)))  # type: ignore[arg-type]


def test_a_backend_keys_equal_bodies_alike_and_leaves_what_orjson_refuses_to_canonical_json():
    """The key the asker joins identical requests in flight on (no cache behind a served backend)."""
    assert _key_json({"b": 1, "a": [1, {"y": 2, "x": "é"}]}) == _key_json({"a": [1, {"x": "é", "y": 2}], "b": 1})
    assert _key_json({"a": 1}) != _key_json({"a": 2})
    assert _key_json({"seed": 2 ** 70}) is None, "beyond 64 bits: None, so that the asker uses canonical_json"
