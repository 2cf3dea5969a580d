"""`teacher.base_url: [URL, URL]`: a fleet of OpenAI-compatible servers, through the real openai SDK against
two loopback fake servers: the load is shared, a dead server is drained, and nothing is lost or paid twice."""
from __future__ import annotations

import json

import pytest
from helpers import API_KEY, read_jsonl, write_prompts, write_recipe

from apprentice.errors import RecipeError
from factory.__main__ import main
from factory.recipe import FactoryConfig, TeacherConfig, load_factory_config
from fakes import FakeConfig, FakeServer


@pytest.fixture
def two_servers():
    servers = [FakeServer(FakeConfig(api_key=API_KEY, latency_s=0.05)) for _ in range(2)]
    for server in servers:
        server.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def fleet_recipe(tmp_path, servers, prompts: int, concurrency: int = 8):
    urls = ", ".join(server.openai_base_url for server in servers)
    return write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run",
                        prompts=write_prompts(tmp_path / "p.jsonl", prompts), provider="openai", base_url=f"[{urls}]", extra_teacher=f"    max_concurrency: {concurrency}\n")


def answered(server) -> int:
    return sum(server.stats.answered.values())


def test_a_fleet_shares_the_load_and_every_prompt_is_answered_once(tmp_path, two_servers, env_key):
    recipe = fleet_recipe(tmp_path, two_servers, 60)
    assert main(["generate", str(recipe)]) == 0
    ids = [record["id"] for record in read_jsonl(tmp_path / "run" / "accepted.jsonl")]
    assert len(ids) == 60 and len(set(ids)) == 60
    first, second = (answered(server) for server in two_servers)
    assert first + second == 60, "one answer per prompt, wherever it came from"
    assert min(first, second) >= 15, f"least outstanding first shares the load: {first} and {second}"


def test_a_server_that_dies_is_drained_and_its_requests_go_elsewhere(tmp_path, two_servers, env_key):
    alive, dying = two_servers
    dying.config.faults = {seq: "drop" for seq in range(5, 100_000)}  # after 4 answers: connections dropped
    recipe = fleet_recipe(tmp_path, two_servers, 60, concurrency=4)
    assert main(["generate", str(recipe)]) == 0
    ids = [record["id"] for record in read_jsonl(tmp_path / "run" / "accepted.jsonl")]
    assert len(ids) == 60 and len(set(ids)) == 60, "the run completes: every prompt once"
    assert answered(alive) + answered(dying) == 60, "no request answered (paid) twice"
    assert answered(dying) == 4
    assert dying.stats.total <= 4 + 3 + 4 + 2, f"drained after its breaker opened: {dying.stats.total} requests"


def test_a_fleet_is_for_openai_compatible_servers_online(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("factory:\n  prompts: {path: p.jsonl}\n  teacher: {provider: anthropic, model: claude-x, "
                      "base_url: [http://a, http://b]}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="base_url: a list of servers"):
        load_factory_config(recipe)
    recipe.write_text("factory:\n  prompts: {path: p.jsonl}\n  teacher: {provider: openai, model: m, "
                      "base_url: [http://a, http://a]}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="distinct URLs"):
        load_factory_config(recipe)


@pytest.mark.one_client
def test_a_server_that_queues_is_sent_what_it_serves_not_max_concurrency(tmp_path, env_key):
    """A vLLM-like server serving 4 requests at once and queueing the rest: with a base_url, concurrency follows
    latency (the default), so requests hardly queue; with follow_latency off, slow start fills the queue up to
    max_concurrency and every answer waits its turn, for the same throughput."""
    waits = {}
    for follow in ("true", "false"):
        with FakeServer(FakeConfig(api_key=API_KEY, latency_s=0.02, capacity=4)) as server:
            folder = tmp_path / follow
            folder.mkdir()
            recipe = write_recipe(folder / "r.yaml", output_dir=folder / "run",
                                  prompts=write_prompts(folder / "p.jsonl", 240), provider="openai",
                                  base_url=server.openai_base_url,
                                  extra_teacher=f"    max_concurrency: 128\n    follow_latency: {follow}\n")
            assert main(["generate", str(recipe)]) == 0
            assert len(read_jsonl(folder / "run" / "accepted.jsonl")) == 240
            late = sorted(server.stats.snapshot()["queue_waits"][120:])
            waits[follow] = late[len(late) // 2]
    assert waits["true"] < waits["false"] / 4, waits
    assert waits["false"] > 0.1, waits  # the blind run did fill the queue: the comparison means something


def test_follow_latency_defaults_on_for_a_server_of_ones_own_and_off_for_hosted_apis(tmp_path):
    for base_url, expected in (("http://127.0.0.1:8000/v1", True), (None, False)):
        config = TeacherConfig(provider="openai", model="m", base_url=base_url)
        assert config.follows_latency is expected
        assert "follow_latency" not in json.dumps(FactoryConfig(prompts={"path": "p.jsonl"},
                                                                teacher=config).fingerprint())
    assert TeacherConfig(provider="openai", model="m", base_url="http://x/v1", follow_latency=False).follows_latency is False
