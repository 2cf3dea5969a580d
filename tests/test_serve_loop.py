"""serve.event_loop: which loop runs the router. `python -m serve` in the other serve tests runs on the default
(auto: uvloop where installed); the in-process routers of tests/serving.py run on asyncio's loop."""
from __future__ import annotations

import asyncio

import pytest
import uvloop
from serving import serve_config

import serve.commands as commands
from apprentice.errors import ApprenticeError


async def answer() -> int:
    return 7


@pytest.mark.parametrize("choice, runner", [("auto", uvloop.run), ("uvloop", uvloop.run), ("asyncio", asyncio.run)])
def test_the_loop_is_uvloop_unless_asyncio_is_asked(choice, runner):
    assert commands.event_loop(choice) is runner
    assert commands.event_loop(choice)(answer()) == 7


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(commands, "uvloop", None)
    assert commands.event_loop("auto") is asyncio.run
    with pytest.raises(ApprenticeError, match=r"serve\.event_loop: uvloop is not installed; pip install uvloop"):
        commands.event_loop("uvloop")


def test_an_unknown_loop_is_refused_by_the_recipe(tmp_path):
    with pytest.raises(ValueError, match="event_loop"):
        serve_config(tmp_path / "log", "http://127.0.0.1:9/v1", event_loop="trio")
