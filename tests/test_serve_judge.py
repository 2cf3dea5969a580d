"""The shadow judge of the serve router: the eval's pairwise judge asked about shadow pairs off the response path,
within its own budget, driven by the real openai SDK against loopback fake servers (student, teacher, judge)."""
from __future__ import annotations

import openai
import pytest
from helpers import API_KEY
from serving import KEY_ENV, RunningRouter, backend, http, serve_config

from apprentice.errors import RecipeError
from factory.served_log import iter_served
from fakes import FakeConfig, FakeServer
from quality_checks.judging import JUDGE_SYSTEM, PAIRWISE_OUTPUT
from serve.config import ServeConfig

PRICE = {"input": 1000.0, "output": 1000.0}  # USD per 1M tokens: a tenth of a cent a token, so budgets are small


def prefers(better: str):
    """A judge that prefers the answer `better`, in whichever position it is (as the JSON its schema asks for)."""
    def responder(messages: list, index: int, body: dict) -> dict:
        prompt = messages[-1]["content"]
        a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        return {"rationale": "One is better.", "winner": "A" if a == better else "B"}
    return responder


@pytest.fixture
def servers(monkeypatch):
    """A student answering "Paris", a teacher answering "Paris." and a judge preferring the teacher's answer."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    started = [FakeServer(FakeConfig(api_key=API_KEY, responder=lambda messages, i, body: "Paris")),
               FakeServer(FakeConfig(api_key=API_KEY, responder=lambda messages, i, body: "Paris.")),
               FakeServer(FakeConfig(api_key=API_KEY, responder=prefers("Paris.")))]
    for server in started:
        server.start()
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def judged_config(log_dir, servers, budget_usd: float = 10.0, **extra) -> ServeConfig:
    student, teacher, judge = servers
    judge_backend = backend(judge.openai_base_url, "judge", price=PRICE, budget_usd=budget_usd)
    return serve_config(log_dir, student.openai_base_url, teacher.openai_base_url,
                        routing={"mode": "student", "shadow": 1.0}, shadow_judge=judge_backend, **extra)


def ask_all(router: RunningRouter, count: int) -> list[str]:
    """`count` requests one after the other, each shadow comparison (and its verdict) logged before the next."""
    client = openai.OpenAI(base_url=router.base_url, api_key="none", max_retries=0)
    answers = []
    for i in range(count):
        answers.append(client.chat.completions.create(
            model="apprentice", messages=[{"role": "user", "content": f"capital of France? {i}"}]
        ).choices[0].message.content)
        router.call(router.router.drain())
    return answers


def shadows(log_dir) -> list[dict]:
    return [line for line in iter_served(log_dir) if "shadow_of" in line]


def test_the_judge_verdicts_on_shadow_pairs_are_logged_and_its_preference_can_ring_the_alarm(tmp_path, servers):
    _, _, judge = servers
    config = judged_config(tmp_path / "log", servers, alarm={"judge_floor": 0.3, "window": 4, "min_samples": 4})
    with RunningRouter(config) as router:
        answers = ask_all(router, 4)
        metrics = http("GET", f"{router.url}/metrics").text
        health = http("GET", f"{router.url}/health")
    assert answers == ["Paris"] * 4, "the student answers; the judge is off the response path"
    lines = shadows(tmp_path / "log")
    assert len(lines) == 4
    verdict = lines[0]["judge"]
    assert verdict["verdicts"] == ["B", "A"], "the student's answer as A, then as B: the teacher's is preferred twice"
    assert (verdict["preferred"], verdict["preference"], verdict["consistent"]) == ("teacher", 0.0, True)
    assert verdict["cost_usd"] > 0, "priced through the factory's pricer"
    assert lines[0]["agree"] is True, "the normaliser's agreement is kept beside the verdict"
    body = judge.stats.bodies[-1]
    assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}, "the eval's judge prompt"
    assert body["response_format"]["json_schema"]["name"] == PAIRWISE_OUTPUT.name, "its verdict schema"
    assert judge.stats.total == 8, "two orders per shadow pair"
    assert 'apprentice_serve_judge_comparisons_total{outcome="judged"} 4' in metrics
    assert "apprentice_serve_rolling_judge_preference 0.0" in metrics
    assert 'apprentice_serve_alarm{kind="judge"} 1' in metrics, "preference 0.0 is below the floor 0.3"
    assert health.status_code == 503 and health.json()["rolling_judge_preference"] == 0.0
    assert any(w.startswith("ALARM: rolling judge 0.000 is below the floor 0.3") for w in router.warnings)


def test_the_judge_stops_when_its_budget_is_spent_and_comparisons_go_on_with_agreement(tmp_path, servers):
    _, _, judge = servers
    # A verdict reserves its worst case (its prompt and 64 tokens out) and costs about 0.07 USD:
    # 0.5 USD pays for two shadow pairs (four verdicts), then refuses a verdict of the third.
    config = judged_config(tmp_path / "log", servers, budget_usd=0.5)
    with RunningRouter(config) as router:
        ask_all(router, 5)
        metrics = http("GET", f"{router.url}/metrics").text
        paid = router.router.judge.cost_usd
    lines = shadows(tmp_path / "log")
    judged = [line for line in lines if "verdicts" in line["judge"]]
    assert len(judged) >= 1, "some pairs are judged before the budget is spent"
    assert all(line["judge"] == {"skipped": "budget_spent"} for line in lines[len(judged):]), \
        "once spent, every later comparison says so"
    assert len(lines) == 5 and all("agree" in line for line in lines), "and goes on with agreement only"
    assert len(judged) < 5, "the budget stops the judge"
    assert paid <= 0.5, "never more than the budget"
    assert judge.stats.total <= 2 * len(judged) + 1, "nothing is sent once the budget is known to be spent"
    assert "apprentice_serve_judge_budget_spent 1" in metrics
    assert f'apprentice_serve_judge_comparisons_total{{outcome="budget_spent"}} {5 - len(judged)}' in metrics
    spent = [w for w in router.warnings if "budget" in w]
    assert len(spent) == 1 and "agreement only" in spent[0], "the log says it once"


def test_a_judge_error_is_counted_and_never_fails_the_users_request(tmp_path, servers):
    _, _, judge = servers
    judge.config.faults.update({1: "500", 2: "500"})  # the first pair's two verdicts fail (no retries)
    config = judged_config(tmp_path / "log", servers)
    with RunningRouter(config) as router:
        answers = ask_all(router, 2)
        metrics = http("GET", f"{router.url}/metrics").text
    assert answers == ["Paris", "Paris"], "the user's answers do not wait for, nor depend on, the judge"
    first, second = shadows(tmp_path / "log")
    assert "500" in first["judge"]["error"] and first["agree"] is True
    assert second["judge"]["preferred"] == "teacher", "the next pair is judged"
    assert 'apprentice_serve_judge_comparisons_total{outcome="error"} 1' in metrics
    assert any("shadow judge: no verdict" in w for w in router.warnings)
    assert all(API_KEY not in w for w in router.warnings), "no key in the log lines"


@pytest.mark.parametrize(("extra", "message"), [
    ({"routing": {"mode": "student"}}, "shadow_judge: it judges shadow comparisons; set routing.shadow"),
    ({"shadow_judge": None, "alarm": {"judge_floor": 0.4}}, "alarm.judge_floor: the judge preference comes from"),
    ({"shadow_judge": {"provider": "openai", "model": "judge"}}, "budget_usd"),
])
def test_a_shadow_judge_that_cannot_work_is_refused_with_its_key(tmp_path, extra, message):
    data = {"log_dir": str(tmp_path), "student": backend("http://127.0.0.1:9/v1", "student"),
            "teacher": backend("http://127.0.0.1:9/v1", "teacher"), "routing": {"mode": "student", "shadow": 0.1},
            "shadow_judge": backend("http://127.0.0.1:9/v1", "judge", price=PRICE, budget_usd=1.0), **extra}
    with pytest.raises(ValueError, match=message):
        ServeConfig.model_validate(data)


def test_a_judge_with_no_price_stops_the_server_before_it_binds(tmp_path, servers):
    config = judged_config(tmp_path / "log", servers)
    config.shadow_judge.price = None  # an unknown model at a base_url: a budget needs its price
    with pytest.raises(RecipeError, match=r"serve\.shadow_judge\.price"), RunningRouter(config):
        pass
