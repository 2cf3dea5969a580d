"""Distillation fidelity: the student scored on its own sft held-out split, the teacher's answers to prompts
it never saw in training, with the task's metrics (`eval.fidelity: N` items).

The split is rebuilt from the student's lineage.json as `sft train` made it (the same runs, held_out, seed and
stratify_by; the runs as they are now, which `sft lineage --verify` checks against training).
"""
from __future__ import annotations

import json
from pathlib import Path

from apprentice.errors import RecipeError
from sft.data import held_out_rows, read_run
from sft.lineage import lineage_path_for

from .config import EvalConfig
from .golden import GoldenItem

SET = "held-out"


def held_out_items(config: EvalConfig) -> list[GoldenItem]:
    name = config.student_name()
    student = next(model for model in config.models if model.name == name)
    path = lineage_path_for(student.model) if student.provider == "local" else None
    if path is None:
        raise RecipeError(f"eval.fidelity: the student {name!r} ({student.model}) has no lineage.json beside it: "
                          "fidelity needs a local student trained by `sft train`; set eval.fidelity: 0")
    lineage = json.loads(path.read_text(encoding="utf-8"))
    sft = lineage.get("sft") or {}
    if not sft.get("held_out"):
        raise RecipeError(f"eval.fidelity: {path} says the student trained with held_out 0: there is no held-out "
                          "split to score; set eval.fidelity: 0")
    rows = [row for run in lineage.get("data") or [] for row in read_run(Path(run["path"]))[0]]
    held = sorted(held_out_rows(rows, sft["held_out"], sft.get("seed", 0), sft.get("stratify_by")))
    return [GoldenItem(id=str(rows[i]["id"]), set=SET, messages=rows[i]["prompt"],
                       reference=rows[i]["completion"][-1]["content"], metrics=list(config.metrics))
            for i in held[:config.fidelity]]
