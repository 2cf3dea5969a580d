"""`apprentice export`: a run's samples after review in five formats, each read back with `datasets`, and a card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import build_tiny_llama, read_jsonl, write_prompts, write_recipe

import apprentice_cli
from factory import review_ledger
from factory.__main__ import main as factory_main
from factory.export import FORMATS, ExportError, export_run, iter_samples
from factory.kd_export import KD_FORMATS


def _record(i: int, question: str, answer: str, *, rejected_by: str | None = None, prompt=None) -> dict:
    return {
        "id": f"{i:016x}{'r' if rejected_by else 'a'}", "prompt_id": f"p{i}", "sample_index": 0,
        "prompt": prompt or [{"role": "system", "content": "answer"}, {"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
        "teacher": {"provider": "openai", "model": "gpt-4o-mini", "params": {}},
        "attributes": {"i": i}, "usage": {"input_tokens": 3, "output_tokens": 1, "cost_usd": 0.0},
        "finish_reason": "stop", "checks": [] if not rejected_by else [
            {"name": rejected_by, "passed": False, "reason": "too short"}],
        "rejected_by": rejected_by,
    }


def write_run(run: Path, accepted: int = 5, rejected: int = 3) -> Path:
    """A run by hand: `accepted` + `rejected` samples (two rejected by `length`, the rest by `refusal`)."""
    run.mkdir(parents=True)
    with (run / "accepted.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(accepted):
            handle.write(json.dumps(_record(i, f"a {i}", f"answer {i} is here")) + "\n")
    with (run / "rejected.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(rejected):
            check = "length" if i < 2 else "refusal"
            handle.write(json.dumps(_record(100 + i, f"r {i}", f"no {i}", rejected_by=check)) + "\n")
    (run / "failed.jsonl").write_text(json.dumps({"id": "f0", "error": "timeout"}) + "\n", encoding="utf-8")
    (run / "manifest.json").write_text(json.dumps({
        "fingerprint_hash": "fp-export", "status": "complete",
        "recipe": {"teacher": {"provider": "openai", "model": "gpt-4o-mini"},
                   "prompts": {"path": "prompts/questions.jsonl"}},
    }), encoding="utf-8")
    return run


@pytest.fixture
def run(tmp_path) -> Path:
    """5 accepted, 3 rejected; review demotes accepted #1 and promotes rejected #0: 5 samples, as sft reads."""
    run = write_run(tmp_path / "run")
    review_ledger.demote(run, [f"{1:016x}a"], "wrong")
    review_ledger.promote(run, [f"{100:016x}r"], "fine after all")
    return run


EXPECTED_IDS = {f"{i:016x}a" for i in (0, 2, 3, 4)} | {f"{100:016x}r"}


def test_iter_samples_reads_what_the_trainer_reads(run):
    from sft.data import read_run

    rows, _ = read_run(run)
    assert {r["id"] for r in iter_samples(run)} == {r["id"] for r in rows} == EXPECTED_IDS
    assert {r["id"] for r in iter_samples(run, rejected=True)} == {f"{1:016x}a", f"{101:016x}r", f"{102:016x}r"}


@pytest.mark.parametrize("fmt", [fmt for fmt in FORMATS if fmt not in KD_FORMATS])  # KD: tests/test_kd_export.py
def test_every_format_loads_with_datasets(run, tmp_path, fmt):
    import datasets

    out = tmp_path / "out"
    assert factory_main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    if fmt in ("messages", "sharegpt", "alpaca"):
        data = datasets.load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
    elif fmt == "parquet":
        data = datasets.load_dataset("parquet", data_files=str(out / "data.parquet"), split="train")
    else:
        data = datasets.load_from_disk(str(out))
    assert len(data) == len(EXPECTED_IDS)
    rows = list(data)
    if fmt == "messages":
        assert rows[0]["messages"] == [{"role": "system", "content": "answer"}, {"role": "user", "content": "a 0"},
                                       {"role": "assistant", "content": "answer 0 is here"}]
        assert any(r["messages"][1]["content"] == "r 0" for r in rows), "the promoted sample is exported"
        assert not any(r["messages"][1]["content"] == "a 1" for r in rows), "the demoted sample is not"
    elif fmt == "sharegpt":
        assert rows[0]["conversations"] == [{"from": "system", "value": "answer"}, {"from": "human", "value": "a 0"},
                                            {"from": "gpt", "value": "answer 0 is here"}]
    elif fmt == "alpaca":
        assert rows[0] == {"instruction": "a 0", "input": "", "output": "answer 0 is here", "system": "answer"}
    else:
        assert set(data.column_names) == {"id", "prompt", "completion"}
        assert {r["id"] for r in rows} == EXPECTED_IDS
        first = next(r for r in rows if r["id"] == f"{0:016x}a")
        assert first["prompt"][-1] == {"role": "user", "content": "a 0"}
        assert first["completion"] == [{"role": "assistant", "content": "answer 0 is here"}]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "openai / `gpt-4o-mini`" in card and "prompts/questions.jsonl" in card
    assert "| run before review: accepted / rejected / failed | 5 / 3 / 1 |" in card
    assert "| length | 2 |" in card and "| refusal | 1 |" in card
    assert "| review: promoted / demoted | 1 / 1 |" in card
    assert "distinct-1" in card and "terms of use" in card
    assert f"samples in this export | {len(EXPECTED_IDS)} |" in card


def test_rejected_exports_the_complement(run, tmp_path):
    result = export_run(run, "messages", tmp_path / "out", rejected=True)
    lines = (tmp_path / "out" / "data.jsonl").read_text(encoding="utf-8").splitlines()
    assert result.samples == len(lines) == 3
    assert {json.loads(line)["messages"][1]["content"] for line in lines} == {"a 1", "r 1", "r 2"}


def test_alpaca_refuses_a_multi_turn_prompt_naming_the_sample_and_leaves_nothing(tmp_path, capsys):
    run = write_run(tmp_path / "run", accepted=2, rejected=0)
    multi = _record(7, "", "third", prompt=[{"role": "user", "content": "one"},
                                           {"role": "assistant", "content": "two"},
                                           {"role": "user", "content": "and?"}])
    with (run / "accepted.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(multi) + "\n")
    out = tmp_path / "out"
    assert factory_main(["export", str(run), "--format", "alpaca", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"sample {multi['id']}" in err and "--format messages" in err
    assert out.is_dir() and list(out.iterdir()) == [], "no half export is left behind"
    assert factory_main(["export", str(run), "--format", "messages", "--out", str(out)]) == 0


@pytest.mark.parametrize("case", ["missing run", "unknown format", "out not empty", "not a run"])
def test_errors_end_in_one_message_and_an_exit_code(run, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = [str(run), "--format", "messages", "--out", str(out)]
    if case == "missing run":
        args[0] = str(tmp_path / "nowhere")
        expected = "run directory not found"
    elif case == "unknown format":
        args[2] = "csv"
        expected = "unknown format 'csv'; choose one of messages, sharegpt, alpaca, parquet, hf"
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine", encoding="utf-8")
        expected = "folder is not empty"
    else:
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
        expected = "no accepted.jsonl or rejected.jsonl"
    assert apprentice_cli.main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if case == "out not empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError):
        export_run(Path(args[0]), args[2], out)


def test_a_generated_run_exports_through_the_apprentice_script(tmp_path, server, env_key, capsys):
    """Six prompts through the fake OpenAI server: p0 and p3 refused; then review, export, read back."""
    import datasets

    def answers(messages, index, body):
        i = int(messages[-1]["content"].split()[-1])
        return "I'm sorry, but I can't help with that." if i % 3 == 0 else f"A fine answer number {i}."

    server.config.responder = answers
    run = tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url)
    assert apprentice_cli.main(["generate", str(recipe)]) == 0
    accepted = {r["prompt_id"]: r["id"] for r in read_jsonl(run / "accepted.jsonl")}
    rejected = {r["prompt_id"]: r["id"] for r in read_jsonl(run / "rejected.jsonl")}
    assert len(accepted) == 4 and len(rejected) == 2
    assert apprentice_cli.main(["review", str(run), "--promote", rejected["p3"], "--why", "fine"]) == 0
    assert apprentice_cli.main(["review", str(run), "--demote", accepted["p1"], "--why", "wrong"]) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert apprentice_cli.main(["export", str(run), "--format", "parquet", "--out", str(out)]) == 0
    assert f"exported 4 accepted sample(s) as parquet to {out / 'data.parquet'}" in capsys.readouterr().err
    data = datasets.load_dataset("parquet", data_files=str(out / "data.parquet"), split="train")
    assert sorted(data["id"]) == sorted({*accepted.values(), rejected["p3"]} - {accepted["p1"]})
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "openai / `gpt-4o-mini`" in card and str(prompts) in card
    assert "| run before review: accepted / rejected / failed | 4 / 2 / 0 |" in card and "| refusal | 2 |" in card


def test_push_to_hub_offline_fails_in_one_message_and_keeps_the_export(run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert apprentice_cli.main(["export", str(run), "--format", "messages", "--out", str(out),
                                "--push-to-hub", "someone/apprentice-demo"]) == 1
    err = capsys.readouterr().err
    assert "pushing" in err and "someone/apprentice-demo failed" in err and "offline" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data.jsonl"], "the export is kept"


def test_push_to_hub_uploads_the_folder_as_a_private_dataset(run, tmp_path, capsys, monkeypatch):
    """Up to the network boundary: HfApi is replaced by one that records what it is asked."""
    import huggingface_hub

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            assert sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()) == ["README.md", "data.parquet"]

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    out = tmp_path / "out"
    assert factory_main(["export", str(run), "--format", "parquet", "--out", str(out),
                         "--push-to-hub", "me/data"]) == 0
    assert "pushed to https://huggingface.co/datasets/me/data" in capsys.readouterr().err
    (_, repo, create), (_, repo2, upload) = calls
    assert repo == repo2 == "me/data" and create["repo_type"] == upload["repo_type"] == "dataset"
    assert create["private"] is True and create["exist_ok"] is True and upload["folder_path"] == str(out)


@pytest.mark.parametrize("fmt,repo,expected", [("hf", "me/data", "the hf format is a save_to_disk folder"),
                                               ("messages", "nodash", "give a dataset repo as OWNER/NAME")])
def test_push_to_hub_refuses_before_writing(run, tmp_path, capsys, fmt, repo, expected):
    out = tmp_path / "out"
    assert factory_main(["export", str(run), "--format", fmt, "--out", str(out), "--push-to-hub", repo]) == 2
    assert expected in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_the_messages_export_trains_with_trl_for_two_steps(run, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    export_run(run, "messages", tmp_path / "out")
    data = datasets.load_dataset("json", data_files=str(tmp_path / "out" / "data.jsonl"), split="train")
    student = build_tiny_llama(tmp_path / "tiny", extra_words=("a", "r", "0", "1", "2", "3", "4", "answer", "is",
                                                               "here", "no"))
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(student),
        processing_class=AutoTokenizer.from_pretrained(student),
        train_dataset=data,
        args=SFTConfig(output_dir=str(tmp_path / "trained"), max_steps=2, per_device_train_batch_size=2,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=32),
    )
    result = trainer.train()
    assert result.global_step == 2
    assert all(entry["loss"] == entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
