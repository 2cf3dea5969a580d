"""Model cards: `sft train` and `apprentice card` write README.md from lineage.json (and the eval table once an
eval scored that student), and push the student to the Hub, tested up to the network boundary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import build_tiny_llama

import apprentice_cli
from sft.card import CardError, find_evaluations, model_card, read_lineage, write_cards

STARTED = "2026-12-06T10:00:00+00:00"


def write_student(root: Path, *, base: str = "meta-llama/Llama-3.2-3B-Instruct", distill: bool = False) -> Path:
    """A trained student's folder by hand: lineage.json, adapter/ (with PEFT's template card) and merged/,
    trained on one data run whose manifest names its teacher."""
    run = root / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"recipe": {"teacher": {"provider": "openai",
                                                                          "model": "gpt-4o-mini"}}}), encoding="utf-8")
    student = root / "runs" / "sft-demo"
    (student / "adapter").mkdir(parents=True)
    (student / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (student / "adapter" / "README.md").write_text("# Model Card for Model ID\n[More Information Needed]\n")
    (student / "merged").mkdir()
    (student / "merged" / "model.safetensors").write_bytes(b"merged weights")
    (student / "loss_curves.png").write_bytes(b"png")
    lineage = {
        "base_model": {"name": base, "path": base},
        "data": [{"path": str(run), "samples": 40, "fingerprint_hash": "fp-demo"}],
        "splits": {"train": 30, "eval": 10, "held_out": 0.25, "seed": 0},
        "sft": {"output_dir": str(student), "qlora": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                                    "target_modules": "all-linear"},
                "learning_rate": 0.01, "lr_scheduler": "cosine", "max_steps": 4, "epochs": 3,
                "per_device_batch_size": 8, "gradient_accumulation_steps": 1,
                "distill": {"alpha": 0.8, "temperature": 2.0} if distill else None},
        "hardware": {"device": "cpu"}, "global_step": 4,
        "metrics": {"eval_loss": 1.23456, "train_loss": 2.5, "train_tokens": 640.0},
        "distill": {"samples": 30, "aligned": 28, "top_k": 20} if distill else None,
        "versions": {"apprentice": "0.1.0"}, "git_commit": "abc123", "started_at": STARTED, "seconds": 12.5,
    }
    (student / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
    return student


def write_results(folder: Path, model_path: str, *, started_at: str = STARTED, student_name: str = "trained student",
                  passed: bool = True) -> Path:
    """An eval's results.json as eval/run.py writes it: a teacher, a baseline and the student at `model_path`."""
    folder.mkdir(parents=True, exist_ok=True)

    def model(role, path, mean, retention=None, lineage=None):
        entry = {"role": role, "provider": "local", "model": path, "lineage": lineage,
                 "metrics": {"overall": {"mean": mean, "low": mean - 0.1, "high": mean + 0.05, "n": 20}}}
        if retention is not None:
            entry["retention"] = {"overall": {"ratio": retention, "low": retention - 0.1, "high": retention + 0.1}}
        return entry

    results = {
        "reference": "teacher", "student": student_name, "items": 20, "golden": ["data/golden/extraction.jsonl"],
        "models": {
            "teacher": model("teacher", "builtin:smollm2-135m-instruct", 0.8),
            "untrained student": model("baseline", "builtin:smollm2-135m-instruct", 0.4, 0.5),
            student_name: model("student", model_path, 0.76, 0.95, {"started_at": started_at}),
        },
        "gate": {"passed": passed, "reason": f"{student_name}: retention 95 % ≥ min_retention 90 %"},
    }
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder / "results.json"


def test_the_card_names_base_method_data_figures_and_terms_without_an_eval(tmp_path):
    student = write_student(tmp_path)
    card = model_card(read_lineage(student), [])
    assert card.startswith("---\nbase_model: \"meta-llama/Llama-3.2-3B-Instruct\"\nlibrary_name: peft\n"), card[:200]
    assert "| method | LoRA: r=4, alpha=8, dropout=0.0, target modules all-linear |" in card
    assert f"| `{tmp_path / 'runs' / 'demo'}` | openai / `gpt-4o-mini` | 40 | `fp-demo` |" in card
    assert "- optimizer steps: 4" in card and "- held-out loss (cross-entropy): 1.2346" in card
    assert "Split: 30 samples trained on, 10 held out" in card
    assert "## Intended use" in card and "OpenAI's terms of use" in card
    assert "its licence could not be read offline" in card, "a gated Hub id not in the cache has no licence to show"
    assert "Not evaluated yet" in card and "distillation |" not in card


def test_the_builtin_base_and_distillation_are_named(tmp_path):
    card = model_card(read_lineage(write_student(tmp_path, base="builtin:smollm2-135m-instruct", distill=True)), [],
                      merged=True)
    assert "base_model: \"HuggingFaceTB/SmolLM2-135M-Instruct\"" in card and "library_name: transformers" in card
    assert "license: \"apache-2.0\"" in card and "licence `apache-2.0`" in card
    assert "α=0.8, T=2.0, k=20; 28 of 30 training samples aligned" in card


def test_a_local_base_models_licence_is_read_from_its_card(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# base\n", encoding="utf-8")
    card = model_card(read_lineage(write_student(tmp_path, base=str(base))), [])
    assert "license: \"mit\"" in card and "licence `mit`" in card
    assert "base_model:" not in card, "a local path is not a Hub id"


def test_the_eval_table_comes_from_the_eval_of_this_training_matched_by_path(tmp_path):
    student = write_student(tmp_path)
    runs = student.parent
    write_results(runs / "eval-old", str(student / "merged"), started_at="2026-01-01T00:00:00+00:00")
    write_results(runs / "eval-other", str(tmp_path / "elsewhere" / "merged"))
    write_results(runs / "eval-demo", str(student / "merged"), passed=False)
    found = find_evaluations(student, read_lineage(student))
    assert [e.path.parent.name for e in found] == ["eval-demo"], "stale and other students' evals are skipped"
    written = write_cards(student)
    assert sorted(p.parent.name for p in written) == ["adapter", "merged", "sft-demo"]
    card = (student / "README.md").read_text(encoding="utf-8")
    assert "| **trained student** (this model) | student | 0.760 [0.660, 0.810] | 95.0 % [85.0 %, 105.0 %] |" in card
    assert "| teacher | teacher | 0.800 [0.700, 0.850] | — |" in card
    assert "| untrained student | baseline | 0.400 [0.300, 0.450] | 50.0 % [40.0 %, 60.0 %] |" in card
    assert "Release gate (on trained student): **FAILED**" in card
    assert "[More Information Needed]" not in (student / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "library_name: transformers" in (student / "merged" / "README.md").read_text(encoding="utf-8")


def test_model_text_is_escaped_for_markdown(tmp_path):
    student = write_student(tmp_path)
    manifest = tmp_path / "runs" / "demo" / "manifest.json"
    manifest.write_text(json.dumps({"recipe": {"teacher": {"provider": "vllm", "model": "a`b|c <i>"}}}))
    write_results(tmp_path / "ev", str(student / "adapter"), student_name="st|u<script>x</script>")
    card = model_card(read_lineage(student), find_evaluations(student, read_lineage(student), [tmp_path / "ev"]))
    row = next(line for line in card.splitlines() if "(this model)" in line)
    assert "<script>" not in card and "st\\|u\\<script\\>x\\</script\\>" in row
    assert row.count(" | ") == 3, "the name's pipe does not open a column"
    data = next(line for line in card.splitlines() if "fp-demo" in line)
    assert "vllm / `a'b\\|c <i>` | 40 |" in data, "in a code span only the backtick and the pipe change"


def test_card_command_writes_the_table_and_names_the_next_step(tmp_path, capsys):
    student = write_student(tmp_path)
    assert apprentice_cli.main(["card", str(student)]) == 0
    err = capsys.readouterr().err
    assert "without an eval table" in err and "next: score it with apprentice eval" in err
    write_results(tmp_path / "somewhere" / "eval", str(student / "merged"))
    assert apprentice_cli.main(["card", str(student), "--eval", str(tmp_path / "somewhere" / "eval")]) == 0
    assert "with an eval table" in capsys.readouterr().err
    assert "(this model)" in (student / "README.md").read_text(encoding="utf-8")


def test_an_eval_folder_named_without_results_or_without_this_student_is_said(tmp_path, capsys):
    student = write_student(tmp_path)
    assert apprentice_cli.main(["card", str(student), "--eval", str(tmp_path / "nowhere")]) == 2
    assert "results.json: not found; --eval names an eval.output_dir" in capsys.readouterr().err
    write_results(tmp_path / "other", str(tmp_path / "another-student" / "merged"))
    assert apprentice_cli.main(["card", str(student), "--eval", str(tmp_path / "other")]) == 0
    assert "note: no model in" in capsys.readouterr().err


def test_card_command_without_a_lineage_fails_in_one_line(tmp_path, capsys):
    assert apprentice_cli.main(["card", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lineage.json: not found" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    with pytest.raises(CardError):
        write_cards(tmp_path)


def test_push_offline_fails_in_one_message_and_keeps_the_student(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    student = write_student(tmp_path)
    before = sorted(p.relative_to(student).as_posix() for p in student.rglob("*"))
    assert apprentice_cli.main(["card", str(student), "--push-to-hub", "someone/student"]) == 1
    err = capsys.readouterr().err
    assert "pushing" in err and "someone/student failed" in err and "offline" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: pushing") and "the student is kept" in last and "Traceback" not in err, err
    after = sorted(p.relative_to(student).as_posix() for p in student.rglob("*"))
    assert set(before) <= set(after) and "README.md" in after


@pytest.mark.parametrize("merged", [False, True])
def test_push_uploads_the_weights_card_and_lineage_in_one_commit(tmp_path, capsys, monkeypatch, merged):
    """Up to the network boundary: HfApi is replaced by one that records what it is asked."""
    import huggingface_hub
    import huggingface_hub.constants

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, **kwargs):
            calls.append(("create_commit", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    student = write_student(tmp_path)
    assert apprentice_cli.main(["card", str(student), "--push-to-hub", "me/student"] + (["--merged"] if merged else [])) == 0
    assert "and its card to https://huggingface.co/me/student" in capsys.readouterr().err
    (_, repo, create), (_, repo2, commit) = calls
    assert repo == repo2 == "me/student" and create["repo_type"] == commit["repo_type"] == "model"
    assert create["private"] is True and create["exist_ok"] is True
    files = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    weights = "model.safetensors" if merged else "adapter_model.safetensors"
    assert sorted(files) == sorted(["README.md", weights, "lineage.json", "loss_curves.png"]), files
    card = Path(files["README.md"]).read_text(encoding="utf-8")
    assert f"library_name: {'transformers' if merged else 'peft'}" in card and "## Training data" in card


def test_a_bad_repo_name_is_refused_before_training(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft:\n  data: [nowhere]\n", encoding="utf-8")
    assert apprentice_cli.main(["train", str(recipe), "--push-to-hub", "no-owner"]) == 2
    assert "give a model repo as OWNER/NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_train_writes_the_card_eval_adds_its_table_and_an_offline_push_keeps_the_student(tmp_path, monkeypatch,
                                                                                        capsys):
    """A real tiny training with --push-to-hub while offline (exit 1, the student and its card kept), a real
    eval of the merged student, then `apprentice card` with the eval's table."""
    import huggingface_hub
    import huggingface_hub.constants
    import torch
    import yaml

    from test_sft import sft_section, upper_task, write_run

    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tiny = build_tiny_llama(tmp_path / "tiny")
    run = write_run(tmp_path / "run", upper_task(24))
    out = tmp_path / "runs" / "sft"
    golden = tmp_path / "g.jsonl"
    golden.write_text("".join(json.dumps({"prompt": f"{c} b", "reference": c.upper()}) + "\n" for c in "abc"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "sft": sft_section(tiny, [run], out),
        "eval": {"output_dir": str(tmp_path / "runs" / "eval"), "golden": [str(golden)], "perf_prompts": 0,
                 "bootstrap": 100, "params": {"temperature": 0, "max_tokens": 2}, "speculative": False,
                 "models": [{"name": "teacher", "role": "teacher", "model": str(tiny)},
                            {"name": "student", "role": "student", "model": str(out / "merged")}]},
    }), encoding="utf-8")
    assert apprentice_cli.main(["train", str(recipe), "--push-to-hub", "me/student"]) == 1
    assert "the student is kept" in capsys.readouterr().err
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "README.md").is_file()
    steps = json.loads((out / "lineage.json").read_text())["global_step"]
    assert f"- optimizer steps: {steps}" in card and "Not evaluated yet" in card
    assert f"| `{run}` | local / `builtin:x` | 24 | `fp-test` |" in card
    assert apprentice_cli.main(["eval", str(recipe)]) == 0  # no gate is set
    assert f"model card: apprentice card {out} --eval {tmp_path / 'runs' / 'eval'} adds this table" in \
        capsys.readouterr().err
    assert apprentice_cli.main(["card", str(out)]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| **student** (this model) | student |" in card and "No release gate was set" in card
