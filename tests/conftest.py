"""Shared fixtures: a loopback fake OpenAI/Anthropic server on both request paths, and the test key in the
environment. The helpers tests import (recipe and prompt writers, a tiny Llama) are in tests/helpers.py."""
from __future__ import annotations

import os

import pytest

from helpers import API_KEY

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_generate_tests(metafunc):
    """Every test that talks to the fake server runs on both request paths of the hosted teachers
    (`teacher.client: raw` and `sdk`, through the variable that sets its default, so that subprocesses,
    judges and eval models take it too). A test marked `one_client` runs once: it uses no teacher (the SDKs
    against the fake), or compares the two paths itself (test_wire.py)."""
    if "server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("one_client") is None:
        metafunc.parametrize("teacher_client", ["raw", "sdk"], indirect=True)


@pytest.fixture
def teacher_client(request, monkeypatch):
    from factory.recipe import CLIENT_ENV

    client = getattr(request, "param", None)
    if client is not None:
        monkeypatch.setenv(CLIENT_ENV, client)
    return client


@pytest.fixture
def server(teacher_client):
    from fakes import FakeConfig, FakeServer

    fake = FakeServer(FakeConfig(api_key=API_KEY))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def env_key(monkeypatch):
    monkeypatch.setenv("APPRENTICE_TEST_KEY", API_KEY)
    return API_KEY
