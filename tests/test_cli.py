"""The command lines a person reads: the `apprentice` script, the short summary of `generate` (-q, -v),
run.log, escaped output, the next-step lines, and `generate --dry-run` (which sends nothing
to the fake server and leaves the run directory as it was)."""
from __future__ import annotations

import json
import os
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest
from helpers import API_KEY, PYTHON, REPO, read_jsonl, write_prompts, write_recipe

import apprentice_cli
from apprentice import __version__
from apprentice.commandline import APPRENTICE_NAMES, VERBOSE
from apprentice.console import CommandConsole
from factory.__main__ import main as factory_main
from factory.plan import TokenCounter
from quality_checks.judging import JUDGE_SYSTEM

SUMMARY = ("teacher", "prompts", "checks", "output", "budget")


def generate(recipe: Path, *extra: str) -> int:
    return factory_main(["generate", str(recipe), *extra])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ---- the apprentice script --------------------------------------------------------------------------------
def test_apprentice_help_lists_every_command_and_version_prints_it():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shown = subprocess.run([PYTHON, "-m", "apprentice_cli", "--help"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    for name in APPRENTICE_NAMES.values():
        assert f"\n    {name} " in shown.stdout, f"`apprentice --help` does not list {name}"
    version = subprocess.run([PYTHON, "-m", "apprentice_cli", "--version"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"apprentice {__version__}"


@pytest.mark.parametrize("name", list(APPRENTICE_NAMES.values()))
def test_every_apprentice_command_has_its_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        apprentice_cli.main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: apprentice {name} ")


def test_the_console_script_is_declared_and_is_the_main_python_m_runs():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, _, attribute = scripts["apprentice"].partition(":")
    assert (module, attribute) == ("apprentice_cli", "main"), "pip install -e . installs `apprentice` from here"
    assert getattr(__import__(module), attribute) is apprentice_cli.main


def test_python_m_factory_sft_eval_keep_their_commands():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for stage, commands in (("factory", ("generate", "review", "stats", "export")), ("sft", ("train", "sweep", "list", "lineage")),
                            ("eval", ("run",))):
        shown = subprocess.run([PYTHON, "-m", stage, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert all(command in shown.stdout for command in commands), shown.stdout


def test_apprentice_generate_runs_the_factory_and_names_the_next_command_its_way(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 3),
                          provider="openai", base_url=server.openai_base_url)
    assert apprentice_cli.main(["generate", str(recipe)]) == 0
    assert len(read_jsonl(run / "accepted.jsonl")) == 3
    last = lines(capsys.readouterr().err)[-1]
    assert last.startswith(f"next: apprentice review {run} "), last
    assert f"apprentice train {recipe}" in last, last
    assert generate(recipe) == 0
    last = lines(capsys.readouterr().err)[-1]
    assert last.startswith(f"next: python -m factory review {run} ") and f"python -m sft train {recipe}" in last, last


# ---- what generate prints ------------------------------------------------------------------------------------
def judge_recipe(tmp_path: Path, server, run: Path, prompts: int = 6) -> Path:
    """A busy first screen: three samples a prompt, a judge after the rules, a budget."""
    def responder(messages: list, index: int, body: dict) -> dict | str:
        if messages[0].get("content") == JUDGE_SYSTEM:  # the judge asks for a structured verdict
            return {"rationale": "Fine.", "score": 8}
        return f"An answer to {messages[-1]['content']}."

    server.config.responder = responder
    judge = ("  checks:\n    - empty\n    - truncated\n    - exact_dup\n"
             "    - name: judge\n      rubric: 'Is it correct?'\n      threshold: 1\n"
             "      teacher: {provider: openai, model: gpt-4o-mini, base_url: '" + server.openai_base_url + "', "
             "api_key_env: APPRENTICE_TEST_KEY}\n"
             "  budget_usd: 5\n")
    return write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", prompts),
                        provider="openai", base_url=server.openai_base_url, n=3, extra=judge)


def test_first_screen_is_a_short_summary_and_the_resolved_recipe_comes_with_v(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = judge_recipe(tmp_path, server, run)
    assert generate(recipe, "--limit", "2") == 0
    capsys.readouterr()
    assert generate(recipe) == 0  # resumed: the busiest first screen
    err = capsys.readouterr().err
    first = lines(err.split("this run:")[0])
    assert len(first) < 15, "\n".join(first)
    assert [line.split()[0] for line in first[1:6]] == list(SUMMARY), "\n".join(first)
    assert "6 from" in first[2] and "→ 6 request(s) → 18 sample(s)" in first[2], first[2]
    assert "judge (gpt-4o-mini)" in first[3] and "(resuming: 2 accepted and 4 rejected" in first[4] and "$5.00" in first[5]
    assert '"samples_per_prompt"' not in err, "the resolved recipe is for -v (and manifest.json)"
    assert generate(recipe, "-v") == 0
    verbose = capsys.readouterr().err
    assert '"samples_per_prompt": 3' in verbose and '"budget_usd": 5' in verbose


def test_quiet_prints_the_last_line_only_and_errors(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 3),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe, "-q") == 0
    shown = lines(capsys.readouterr().err)
    assert len(shown) == 1 and shown[0].startswith("next: python -m factory review"), shown
    assert generate(recipe, "-q", "--set", "factory.samples_per_promt=2") == 2
    shown = lines(capsys.readouterr().err)
    assert shown[0].startswith("error:") and "did you mean `samples_per_prompt`?" in shown[-1], shown
    # what -q hides still reaches run.log
    log = (run / "run.log").read_text(encoding="utf-8")
    assert "teacher  openai gpt-4o-mini" in log and "this run: 3/3 samples" in log


def test_run_log_keeps_each_run_and_what_the_terminal_showed(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 4),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe, "--limit", "2") == 0
    assert generate(recipe) == 0
    err = capsys.readouterr().err
    log = (run / "run.log").read_text(encoding="utf-8")
    assert log.count("\n--- ") + log.startswith("--- ") == 2, "one header per run, appended"
    second = lines(log.split("\n--- ")[-1])[1:]  # the second run, after its header
    assert second[0] == f"python -m factory generate {recipe} → {run}"
    assert all(line in err for line in second), "run.log holds what the terminal showed"
    assert "resuming: 2 accepted" in "\n".join(second) and second[-1].startswith("next: ")


def test_the_transcript_masks_secrets_and_keeps_warnings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_PROVIDER_CREDS", "sk-very-secret-value-123")  # a name that does not say "key"
    monkeypatch.setenv("SOME_API_KEY", API_KEY)
    console = CommandConsole(VERBOSE)
    console.print(f"early: {API_KEY}")
    console.open_log(tmp_path / "run.log", ["MY_PROVIDER_CREDS"])
    console.print("later: sk-very-secret-value-123 and more")
    with console.warnings_shown():
        warnings.warn("a library is unhappy [really]", UserWarning)
    console.close_log()
    log = (tmp_path / "run.log").read_text(encoding="utf-8")
    assert API_KEY not in log and "sk-very-secret-value-123" not in log
    assert "early: ***" in log and "later: *** and more" in log
    assert "warning: a library is unhappy [really] (UserWarning" in log
    assert "a library is unhappy [really]" in capsys.readouterr().err


def test_paths_and_errors_with_markup_are_printed_as_they_are(tmp_path, server, env_key, capsys):
    folder = tmp_path / "[red]odd [bold]dir"
    folder.mkdir()
    run = folder / "run"
    prompts = write_prompts(folder / "p.jsonl", 2)
    recipe = folder / "r.yaml"
    recipe.write_text(f"factory:\n  output_dir: {json.dumps(str(run))}\n  prompts: {{path: {json.dumps(str(prompts))}}}\n"
                      f"  teacher: {{provider: openai, model: gpt-4o-mini, base_url: '{server.openai_base_url}', "
                      "api_key_env: APPRENTICE_TEST_KEY, params: {max_tokens: 64}}\n")
    assert generate(recipe) == 0, capsys.readouterr().err
    assert generate(recipe, "--dry-run") == 0
    err = capsys.readouterr().err
    assert f"→ {run}" in err and f"output   {run}" in err
    assert generate(recipe, "--set", f"factory.prompts.path={folder / '[bold]missing.jsonl'}") == 2
    assert f"{folder / '[bold]missing.jsonl'}: prompts file not found" in capsys.readouterr().err


# ---- generate --dry-run -------------------------------------------------------------------------------------
def dry(recipe: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = generate(recipe, "--dry-run", *extra)
    return code, capsys.readouterr().err


def row(err: str, name: str) -> str:
    return next(line for line in err.splitlines() if line.startswith(f"{name} "))


@pytest.mark.parametrize("provider,n,extra_teacher,requests", [
    ("openai", 3, "", 6),  # the API's n: one request a prompt
    ("anthropic", 2, "", 12),  # no n: one request a sample
    ("openai", 3, "    param_ranges: {temperature: [0.2, 1.0]}\n", 18),  # a draw a sample: a request each
])
def test_dry_run_counts_requests_sends_nothing_and_creates_nothing(tmp_path, server, env_key, capsys, provider, n,
                                                                   extra_teacher, requests):
    run = tmp_path / "run"
    base_url = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    model = "gpt-4o-mini" if provider == "openai" else "claude-haiku-4-5"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 6),
                          provider=provider, base_url=base_url, model=model, n=n, extra_teacher=extra_teacher,
                          extra="  budget_usd: 1\n")
    code, err = dry(recipe, capsys)
    assert code == 0, err
    assert server.stats.total == 0, "a dry run sends nothing"
    assert not run.exists(), "a dry run neither creates nor locks the run directory"
    assert f"6 from {tmp_path / 'p.jsonl'} → {requests} request(s) → {6 * n} sample(s)" in row(err, "prompts")
    assert f"(max_tokens 64 × {6 * n} sample(s))" in row(err, "tokens")
    assert row(err, "cost").startswith("cost     $") and "every answer max_tokens long" in row(err, "cost")
    assert "fits even if every answer is max_tokens long" in row(err, "budget")
    assert lines(err)[-1] == f"next: python -m factory generate {recipe} (without --dry-run) to run it"


def test_dry_run_of_a_started_run_counts_what_is_left_reads_its_records_and_changes_nothing(
        tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 10),
                          provider="openai", base_url=server.openai_base_url, n=2)
    assert generate(recipe, "--limit", "4") == 0
    records = read_jsonl(run / "accepted.jsonl")
    mean = sum(r["usage"]["output_tokens"] / r["usage"]["shared_by"] for r in records) / len(records)
    before = snapshot(run)
    server.reset_stats()
    code, err = dry(recipe, capsys)
    assert code == 0, err
    assert server.stats.total == 0 and snapshot(run) == before, "the run directory is read, never written"
    assert "8 sample(s) done, 0 request(s) answered by the cache → 6 request(s) to send" in row(err, "on disk")
    assert f"~{round(mean * 12):,} at the mean of 8 record(s)" in row(err, "tokens")
    assert "calibrated on the run's records" in row(err, "tokens") or "bpe-openai" in row(err, "tokens")
    # Answers paid for but not written (a crash between the cache and the records) are free next time.
    (run / "accepted.jsonl").write_text("")
    code, err = dry(recipe, capsys, "--limit", "4")
    assert "0 sample(s) done, 4 request(s) answered by the cache → 0 request(s) to send" in row(err, "on disk")
    assert row(err, "cost").startswith("cost     $0 (input only) to $0 (")


def test_dry_run_refuses_what_the_run_would_refuse(tmp_path, server, env_key, monkeypatch, capsys):
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url)
    code, err = dry(recipe, capsys, "--set", "factory.teacher.model=my-own-model", "--set", "factory.budget_usd=1")
    assert code == 2 and "factory.teacher.price" in err
    code, err = dry(recipe, capsys, "--set", "factory.budget_usd=0.000001")
    assert code == 0 and "too small even for the input" in row(err, "budget"), err
    code, err = dry(recipe, capsys, "--set", "factory.budget_usd=0.00002")
    assert code == 0 and "may be reached: the run then stops" in row(err, "budget"), err
    with prompts.open("a") as handle:
        handle.write('{"prompt": 42}\n')
    code, err = dry(recipe, capsys)
    assert code == 2 and f"{prompts}:4:" in err
    monkeypatch.delenv("APPRENTICE_TEST_KEY")
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "q.jsonl", 1),
                          provider="anthropic", base_url="null")
    code, err = dry(recipe, capsys)
    assert code == 2 and "APPRENTICE_TEST_KEY is not set" in err
    assert server.stats.total == 0 and not run.exists()


def test_dry_run_refuses_settings_that_differ_from_the_run_directory(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 2),
                          provider="openai", base_url=server.openai_base_url)
    assert generate(recipe) == 0
    code, err = dry(recipe, capsys, "--set", "factory.teacher.model=gpt-4o")
    assert code == 2 and "holds samples made with other settings" in err


def test_dry_run_of_a_grid_and_of_self_instruct_writes_nothing(tmp_path, server, env_key, capsys):
    run = tmp_path / "run"
    seeds = write_prompts(tmp_path / "seeds.jsonl", 4, prefix="a seed question of some length")
    recipe = tmp_path / "r.yaml"
    teacher = (f"  teacher: {{provider: openai, model: gpt-4o-mini, base_url: '{server.openai_base_url}', "
               "api_key_env: APPRENTICE_TEST_KEY, params: {max_tokens: 100}}\n")
    recipe.write_text(f"factory:\n  output_dir: {run}\n"
                      "  prompts: {grid: {template: 'Explain {t} to {p}.', attributes: {t: [a, b, c], p: [x, y]}}}\n"
                      + teacher)
    code, err = dry(recipe, capsys)
    assert code == 0, err
    assert "6 from " in row(err, "prompts") and "→ 6 request(s)" in row(err, "prompts")
    recipe.write_text(f"factory:\n  output_dir: {run}\n"
                      f"  prompts: {{self_instruct: {{seeds: {seeds}, count: 20, per_request: 4}}}}\n" + teacher)
    code, err = dry(recipe, capsys)
    assert code == 0, err
    assert "20 from self-instruct (not written yet: sized like the 4 seeds)" in row(err, "prompts")
    assert "self-instruct first: 5 to 25 request(s)" in row(err, "expand")
    assert server.stats.total == 0 and not run.exists()


def test_input_tokens_with_the_models_encoding_or_the_character_estimate():
    text = [{"role": "user", "content": "Hello world, how are you?"}]
    assert TokenCounter("anthropic", "claude-haiku-4-5", None).count(text) == len(text[0]["content"]) // 4 + 4
    assert TokenCounter("openai", "my-own-model", None).name == "characters / 4"
    pytest.importorskip("bpe_openai")
    counter = TokenCounter("openai", "gpt-4o-mini-2024-07-18", None)
    assert counter.name == "o200k_base (bpe-openai)"
    assert counter.count(text) == 7 + 3 + 3, "o200k_base: 7 tokens, 3 of framing for the message, 3 for the answer"
    assert TokenCounter("openai", "gpt-4-turbo", None).name == "cl100k_base (bpe-openai)"
