"""Clear stops: one writer per run directory, a full disk, an output_dir that is a file, and every bad
input of the three commands ending in one message and an exit code, never a traceback."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import API_KEY, PYTHON, REPO, read_jsonl, write_prompts, write_recipe

from factory import run as run_module
from factory.__main__ import main
from factory.cache import ResponseCache
from factory.lock import LOCK, DirectoryInUse, DirectoryLock
from factory.store import ACCEPTED, Store


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    return subprocess.run([PYTHON, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ---- one writer per run directory ----------------------------------------------------------------------
def test_a_second_generate_on_a_run_directory_in_use_exits_2_naming_the_pid(tmp_path, server, env_key):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url)
    with DirectoryLock(run):  # another process's generate, as far as the second one can tell
        second = cli("factory", "generate", str(recipe))
    assert second.returncode == 2, second.stderr
    assert f"{run} is in use by pid {os.getpid()}; wait for it or stop it" in second.stderr
    assert "Traceback" not in second.stderr
    assert server.stats.total == 0, "the refused run sent nothing"
    assert not (run / ACCEPTED).exists(), "the refused run wrote no record"
    assert main(["generate", str(recipe)]) == 0, "the lock is released with the process that held it"
    assert len(read_jsonl(run / ACCEPTED)) == 5


@pytest.mark.slow
def test_two_generates_at_once_leave_every_prompt_once(tmp_path, server, env_key):
    server.config.latency_s = 0.2  # 40 prompts, 2 at a time: the first run lasts about 4 s
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, extra_teacher="    max_concurrency: 2\n")
    env = dict(os.environ, APPRENTICE_TEST_KEY=API_KEY)
    first = subprocess.Popen([PYTHON, "-m", "factory", "generate", str(recipe)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock, deadline = run / LOCK, time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:  # it holds the lock once its pid is written
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.02)
        second = cli("factory", "generate", str(recipe))
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
    ids = [record["id"] for record in read_jsonl(run / ACCEPTED)]
    assert len(ids) == 40, "every prompt once"
    assert len(set(ids)) == 40, "no record twice"


def test_readers_never_wait_for_the_lock(tmp_path, server, env_key):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url)
    assert main(["generate", str(recipe)]) == 0
    with DirectoryLock(run):
        stats = cli("factory", "stats", str(run), "--json")
        review = cli("factory", "review", str(run))
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["counts"]["accepted"] == 3
    assert review.returncode == 0, review.stderr


def test_a_lock_is_exclusive_within_one_process_too_and_names_the_holder(tmp_path):
    with DirectoryLock(tmp_path / "run"):
        with pytest.raises(DirectoryInUse, match=f"in use by pid {os.getpid()}"):
            DirectoryLock(tmp_path / "run").acquire()
    DirectoryLock(tmp_path / "run").acquire()  # released on exit


# ---- output_dir that is a file -------------------------------------------------------------------------
def test_output_dir_that_is_a_file_exits_2_naming_it(tmp_path, server, env_key, capsys):
    taken = tmp_path / "run"
    taken.write_text("not a directory\n")
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=taken, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url)
    assert main(["generate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"factory.output_dir: {taken} is a file, not a directory" in err
    assert taken.read_text() == "not a directory\n", "the file is left as it was"
    assert server.stats.total == 0


def test_output_dir_below_a_file_exits_2_naming_it(tmp_path, server, env_key, capsys):
    (tmp_path / "file").write_text("x")
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "file" / "run", prompts=prompts,
                          provider="openai", base_url=server.openai_base_url)
    assert main(["generate", str(recipe)]) == 2
    assert f"factory.output_dir: cannot create {tmp_path / 'file' / 'run'}" in capsys.readouterr().err


# ---- a full disk ---------------------------------------------------------------------------------------
class _FillingFile:
    """A raw append-only file that takes part of the bytes of its `room`-th write, then has no space."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        if self.room == 0:
            return self.handle.write(bytes(data)[: len(data) // 2])  # a short write: half a line
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_full_disk_stops_with_one_message_every_line_whole_and_the_same_command_resumes(
        tmp_path, server, env_key, monkeypatch, capsys):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, extra_teacher="    max_concurrency: 1\n")

    class FullDiskStore(Store):
        def __init__(self, run_dir: Path) -> None:
            super().__init__(run_dir)
            self._files[ACCEPTED] = _FillingFile(self._files[ACCEPTED], room=5)

    monkeypatch.setattr(run_module, "Store", FullDiskStore)
    assert main(["generate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert f"no space left on {run / ACCEPTED}" in err
    assert "Traceback" not in err
    lines = (run / ACCEPTED).read_text().splitlines(keepends=True)
    assert len(lines) == 4, "four whole records; the fifth, cut short, is undone"
    assert all(line.endswith("\n") and json.loads(line) for line in lines), "every line on disk is whole"
    assert json.loads((run / "manifest.json").read_text())["status"] == "stopped"

    monkeypatch.setattr(run_module, "Store", Store)  # space is back
    assert main(["generate", str(recipe)]) == 0
    ids = [record["id"] for record in read_jsonl(run / ACCEPTED)]
    assert len(ids) == 12 and len(set(ids)) == 12, "every prompt once, none twice"
    assert server.stats.total <= 12 + 1, "nothing paid twice beyond the one request in flight"


def test_a_full_disk_under_the_cache_is_the_same_stop(tmp_path):
    cache = ResponseCache(tmp_path / "cache.sqlite")

    class FullDatabase:
        def __init__(self, db) -> None:
            self.db = db

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    cache._db = FullDatabase(cache._db)
    with pytest.raises(OSError) as raised:
        cache.put("k", {"choices": []}, 0.0)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "cache.sqlite")


# ---- no traceback, whatever the input ------------------------------------------------------------------
def _bad_inputs(tmp: Path) -> list[tuple[str, list[str]]]:
    (tmp / "bad.yaml").write_text("factory: [unclosed\n")
    (tmp / "unknown.yaml").write_text("factory:\n  prompts: {path: p.jsonl}\n  colour: red\n")
    (tmp / "noprompts.yaml").write_text(f"factory:\n  output_dir: {tmp / 'o1'}\n  prompts: {{path: {tmp / 'none.jsonl'}}}\n")
    (tmp / "badline.jsonl").write_text('{"prompt": "fine"}\nnot json\n')
    (tmp / "badline.yaml").write_text(f"factory:\n  output_dir: {tmp / 'o2'}\n  prompts: {{path: {tmp / 'badline.jsonl'}}}\n")
    (tmp / "good.jsonl").write_text('{"prompt": "fine"}\n')
    (tmp / "nokey.yaml").write_text(f"factory:\n  output_dir: {tmp / 'o3'}\n  prompts: {{path: {tmp / 'good.jsonl'}}}\n"
                                    "  teacher: {provider: openai, model: gpt-4o-mini, api_key_env: APPRENTICE_NO_SUCH_KEY}\n")
    (tmp / "file").write_text("x")
    (tmp / "sft.yaml").write_text(f"sft:\n  data: [{tmp / 'no-run'}]\n  output_dir: {tmp / 's1'}\n")
    (tmp / "sftkey.yaml").write_text("sft:\n  data: [x]\n  lora: {rank: 4}\n")
    (tmp / "eval.yaml").write_text(f"eval:\n  output_dir: {tmp / 'e1'}\n  golden: [{tmp / 'none.jsonl'}]\n"
                                   "  models: [{name: m, provider: local}]\n")
    (tmp / "golden.jsonl").write_text('{"prompt": "q", "reference": "a"}\n{"prompt": 3}\n')
    (tmp / "evalline.yaml").write_text(f"eval:\n  output_dir: {tmp / 'e2'}\n  golden: [{tmp / 'golden.jsonl'}]\n"
                                       "  models: [{name: m, provider: local}]\n")
    return [
        ("factory", ["generate", str(tmp / "missing.yaml")]),
        ("factory", ["generate", str(tmp / "bad.yaml")]),
        ("factory", ["generate", str(tmp / "unknown.yaml")]),
        ("factory", ["generate", str(tmp / "noprompts.yaml")]),
        ("factory", ["generate", str(tmp / "badline.yaml")]),
        ("factory", ["generate", str(tmp / "nokey.yaml")]),
        ("factory", ["generate", str(tmp / "badline.yaml"), "--set", "factory.output_dir=" + str(tmp / "file")]),
        ("factory", ["generate", str(tmp / "badline.yaml"), "--limit", "0"]),
        ("factory", ["stats", str(tmp / "no-run")]),
        ("factory", ["stats", str(tmp / "file")]),
        ("factory", ["review", str(tmp / "no-run")]),
        ("sft", ["train", str(tmp / "missing.yaml")]),
        ("sft", ["train", str(tmp / "sft.yaml")]),
        ("sft", ["train", str(tmp / "sftkey.yaml")]),
        ("sft", ["sweep", str(tmp / "sft.yaml"), "--temperatures", "a,b"]),
        ("eval", ["run", str(tmp / "missing.yaml")]),
        ("eval", ["run", str(tmp / "eval.yaml")]),
        ("eval", ["run", str(tmp / "evalline.yaml")]),
    ]


@pytest.mark.slow
def test_every_bad_input_of_the_three_commands_ends_in_one_message_and_an_exit_code(tmp_path):
    cases = _bad_inputs(tmp_path)
    env = dict(os.environ)
    env.pop("APPRENTICE_NO_SUCH_KEY", None)
    procs = [(package, args, subprocess.Popen([PYTHON, "-m", package, *args], cwd=REPO, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for package, args in cases]
    failures = []
    for package, args, proc in procs:
        out, err = proc.communicate(timeout=180)
        command = f"python -m {package} {' '.join(args)}"
        if "Traceback" in out + err:
            failures.append(f"{command}: traceback\n{err[-800:]}")
        elif proc.returncode not in (1, 2):
            failures.append(f"{command}: exit {proc.returncode}")
        elif "error" not in err.lower():
            failures.append(f"{command}: no error message\n{err[-400:]}")
    assert failures == [], "\n\n".join(failures)
