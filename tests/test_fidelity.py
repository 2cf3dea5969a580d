"""Distillation fidelity: eval scores the student on its own sft held-out split, rebuilt from its lineage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_tiny_llama

from eval.__main__ import main
from sft.config import SFTConfig
from sft.data import held_out_rows, read_run
from test_sft import upper_task, write_run

torch.set_num_threads(1)


def _setup(tmp_path: Path, held_out: float = 0.25) -> Path:
    """A 'trained' student: a tiny random Llama in student/merged, a lineage.json as sft train writes it."""
    base = build_tiny_llama(tmp_path / "tiny")
    shutil.copytree(base, tmp_path / "student" / "merged")
    run = write_run(tmp_path / "run", upper_task(16))
    (tmp_path / "student" / "lineage.json").write_text(json.dumps({
        "data": [{"path": str(run), "samples": 16}],
        "sft": SFTConfig(data=[run], held_out=held_out).model_dump(mode="json")}))
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"id": "g0", "prompt": "a b", "reference": "A"}) + "\n")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {
        "output_dir": str(tmp_path / "out"), "golden": [str(golden)], "fidelity": 3, "perf_prompts": 0,
        "bootstrap": 100, "params": {"temperature": 0, "max_tokens": 2},
        "models": [{"name": "teacher", "role": "teacher", "provider": "local", "model": str(base)},
                   {"name": "student", "role": "student", "provider": "local",
                    "model": str(tmp_path / "student" / "merged")}]}}))
    return recipe


def test_the_student_is_scored_on_the_held_out_teacher_answers_it_never_trained_on(tmp_path):
    recipe = _setup(tmp_path)
    assert main(["run", str(recipe)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["fidelity"]["items"] == 3 and set(results["fidelity"]["models"]) == {"teacher", "student"}
    assert results["items"] == 1, "the held-out samples are not part of the task's score"
    rows, _ = read_run(tmp_path / "run")
    held = [rows[i]["id"] for i in sorted(held_out_rows(rows, 0.25, 0, None))]
    assert results["fidelity"]["ids"] == held[:3], "the split sft train held out, rebuilt from the lineage"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Fidelity on the held-out teacher data" in report and "3 held-out training prompts" in report

@pytest.mark.parametrize("change,message", [
    ("held_out", "says the student trained with held_out 0: there is no held-out split to score"),
    ("lineage", "has no lineage.json beside it: fidelity needs a local student trained by `sft train`"),
])
def test_fidelity_without_a_split_or_a_lineage_is_refused(tmp_path, capsys, change, message):
    recipe = _setup(tmp_path, held_out=0.0 if change == "held_out" else 0.25)
    if change == "lineage":
        (tmp_path / "student" / "lineage.json").unlink()
    assert main(["run", str(recipe)]) == 2
    assert message in capsys.readouterr().err
