"""Lineage you can check: `sft train` hashes the content it trained on, `eval run` records its results and the
golden sets' bytes in the student's lineage, and `sft lineage --verify` names each change since."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import yaml
from helpers import build_tiny_llama

from rich.console import Console

import apprentice_cli
from eval.config import EvalConfig
from eval.run import evaluate
from factory.review_ledger import demote
from sft.config import SFTConfig
from sft.lineage import run_content, verify
from test_sft import sft_section, upper_task, write_run

torch.set_num_threads(1)


def changed(student: Path) -> list[str]:
    return [finding.detail for finding in verify(student) if finding.changed]


def test_run_content_hashes_prompts_ids_and_review_decisions(tmp_path):
    run = write_run(tmp_path / "run", upper_task(4))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a b"}\n')
    (run / "manifest.json").write_text(json.dumps({"fingerprint_hash": "fp", "recipe": {"prompts": {"path": str(prompts)}}}))
    first = run_content(run)
    assert first["accepted"]["count"] == 4 and first["rejected"]["count"] == 0 and first["review"]["decisions"] == 0
    assert first["prompts"] == [{"path": str(prompts), "sha256": first["prompts"][0]["sha256"]}] and first["settings"] == "fp"
    assert run_content(run) == first, "the same content hashes the same"
    demote(run, ["s1"], "wrong")
    assert run_content(run)["review"]["decisions"] == 1
    assert run_content(run)["accepted"] == first["accepted"], "a decision leaves the record files as they are"


def test_lineage_of_a_folder_without_one_is_refused_naming_it(tmp_path, capsys):
    from sft.__main__ import main

    assert main(["lineage", str(tmp_path), "--verify"]) == 2
    assert f"{tmp_path}: no lineage.json" in capsys.readouterr().err
    (tmp_path / "lineage.json").write_text(json.dumps({"data": [{"path": "runs/x", "samples": 3}]}))
    (tmp_path / "adapter").mkdir()
    assert [f.detail for f in verify(tmp_path)] == ["runs/x: trained before content hashing: nothing to compare; "
                                                    "train again to record it"]


def test_verify_names_an_added_review_decision_more_accepted_samples_and_an_edited_golden_set(tmp_path, capsys):
    from sft.__main__ import main
    from sft.train import find_students, train

    student_base = build_tiny_llama(tmp_path / "tiny")
    run = write_run(tmp_path / "run", upper_task(16))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in upper_task(16)))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "recipe": {"prompts": {"path": str(prompts)}}}))
    out = tmp_path / "student"
    result = train(SFTConfig(**sft_section(student_base, [run], out, max_steps=1)))
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps({"id": f"g{i}", "prompt": q, "reference": a}) + "\n"
                              for i, (q, a) in enumerate(upper_task(3, seed=5))))
    evaluate(EvalConfig(output_dir=tmp_path / "eval", golden=[golden], perf_prompts=1, bootstrap=100,
                        params={"temperature": 0, "max_tokens": 2}, gate={"min_retention": 0.5},
                        models=[{"name": "base", "role": "teacher", "provider": "local", "model": str(student_base)},
                                {"name": "mine", "role": "student", "provider": "local",
                                 "model": str(result.merged_dir)}]), console=Console(file=io.StringIO()))

    lineage = json.loads((out / "lineage.json").read_text())
    entry = lineage["evals"][0]
    assert entry["model_name"] == "mine" and entry["eval_dir"] == str(tmp_path / "eval")
    assert entry["gate"]["passed"] in (True, False) and entry["golden"][0]["path"] == str(golden)
    assert "latency_p99_s" in entry["perf"] and 0 <= entry["score"] <= 1
    assert not (tmp_path / "tiny" / "lineage.json").exists(), "only trained students get a record"
    listed = find_students(tmp_path)[0]
    assert listed["score"] == entry["score"], "sft list shows the last eval's score"
    assert listed["latency_p50_s"] == entry["perf"]["latency_p50_s"] and entry["frontier"]["speedup"] > 0
    assert changed(out) == [], "nothing changed yet"
    assert main(["lineage", str(out / "merged"), "--verify"]) == 0
    assert "hashes match" in capsys.readouterr().err

    seen: set[str] = set()

    def newly_changed() -> list[str]:
        now = changed(out)
        new = [detail for detail in now if detail not in seen]
        seen.update(now)
        return new

    demote(run, ["s2"], "a reviewer disagreed")
    assert newly_changed() == [f"{run}: review decision(s) added: 0 at training, 1 now (factory review)"]
    with (run / "accepted.jsonl").open("a") as handle:
        record = json.loads((run / "accepted.jsonl").read_text().splitlines()[0])
        handle.write(json.dumps({**record, "id": "s-new"}) + "\n")
    assert newly_changed() == [f"{run}: more accepted samples: 16 at training, 17 now"]
    golden.write_text(golden.read_text().replace('"reference": "', '"reference": "not '))
    [edited] = newly_changed()
    assert edited.startswith(f"golden set {golden} changed since eval {tmp_path / 'eval'} (sha256 "), edited
    prompts.write_text(prompts.read_text() + '{"prompt": "z z"}\n')
    [edited] = newly_changed()
    assert edited.startswith(f"{run}: prompts file {prompts} changed"), edited
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"tampered")
    [edited] = newly_changed()
    assert edited.startswith("adapter weights"), edited
    capsys.readouterr()
    assert main(["lineage", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "5 change(s) since training or eval" in err, err
    assert apprentice_cli.main(["lineage", str(out), "--verify", "-q"]) == 1, "`apprentice lineage` is the same"
    assert main(["lineage", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "eval " in shown and "mine scored" in shown and "16 accepted" in shown, shown
    assert yaml.safe_load((out / "lineage.json").read_text())["data"][0]["content"]["accepted"]["count"] == 16

