"""`factory review`: counts by reason, panels per reason, promote/demote into review.jsonl, the trainer
honouring it, load_run for pandas, and the review notebook executed top to bottom."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, read_jsonl, write_prompts, write_recipe

from factory import review, review_ledger
from factory.__main__ import main

MARKUP = "I'm sorry, but I can't help with [bold red]that[/] [link=x]."


def answers(messages, index, body):
    i = int(messages[-1]["content"].split()[-1])
    return MARKUP if i % 3 == 0 else f"A fine answer number {i}."


@pytest.fixture
def run(tmp_path, server, env_key) -> Path:
    """Nine prompts through the real SDK: p0, p3, p6 refused (rejected), the other six accepted."""
    server.config.responder = answers
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 9),
                          provider="openai", base_url=server.openai_base_url)
    assert main(["generate", str(recipe)]) == 0
    return run


def ids(run: Path, name: str) -> dict[str, str]:
    return {r["prompt_id"]: r["id"] for r in read_jsonl(run / name)}


def test_counts_and_panels_escape_model_text(run, capsys):
    capsys.readouterr()
    assert main(["review", str(run)]) == 0
    out = capsys.readouterr().out
    assert "refusal" in out and "3 × refusal" in out
    assert main(["review", str(run), "--reason", "refusal"]) == 0
    out = capsys.readouterr().out
    # the answer's own "[bold red]" and "[/]" are shown as written, not taken as rich markup
    assert out.count("[bold red]that[/] [link=x].") == 3
    assert "rejected by refusal" in out and "question 3" in out
    assert main(["review", str(run), "--reason", "refusal", "--limit", "1"]) == 0
    assert capsys.readouterr().out.count("rejected by refusal") == 1
    assert main(["review", str(run), "--reason", "nosuch"]) == 2
    assert "checks that rejected: refusal" in capsys.readouterr().err


def test_promote_and_demote_write_review_jsonl_and_the_trainer_follows(run, capsys):
    from sft.data import read_run

    rejected, accepted = ids(run, "rejected.jsonl"), ids(run, "accepted.jsonl")
    assert main(["review", str(run), "--promote", rejected["p3"], "--why", "not a refusal"]) == 0
    assert main(["review", str(run), "--demote", accepted["p1"][:8], accepted["p2"], "--why", "wrong"]) == 0
    lines = read_jsonl(run / "review.jsonl")
    assert [(line["id"], line["action"], line["reason"]) for line in lines] == [
        (rejected["p3"], "promote", "not a refusal"), (accepted["p1"], "demote", "wrong"), (accepted["p2"], "demote", "wrong")]
    assert all(line["time"].endswith("Z") for line in lines)
    effective = review_ledger.effective_ids(run)
    assert effective == set(accepted.values()) - {accepted["p1"], accepted["p2"]} | {rejected["p3"]}

    rows, info = read_run(run)
    assert {row["id"] for row in rows} == effective and info.samples == 5
    promoted = next(row for row in rows if row["id"] == rejected["p3"])
    assert promoted["completion"][0]["content"] == MARKUP

    # the last decision wins: demoting the promoted sample takes it out again
    review_ledger.demote(run, [rejected["p3"]], why="on second thought, it is one")
    assert rejected["p3"] not in review_ledger.effective_ids(run)
    assert {row["id"] for row in read_run(run)[0]} == effective - {rejected["p3"]}

    capsys.readouterr()
    assert main(["stats", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["review"] == {"promoted": 0, "demoted": 3}


def test_unknown_ids_or_no_reason_write_nothing(run, capsys):
    rejected = ids(run, "rejected.jsonl")
    assert main(["review", str(run), "--promote", rejected["p0"], "feedbeef00000000", "--why", "x"]) == 2
    assert "unknown sample id(s): feedbeef00000000" in capsys.readouterr().err
    assert main(["review", str(run), "--promote", rejected["p0"]]) == 2
    assert "--why" in capsys.readouterr().err
    assert main(["review", str(run), "--promote", "abc", "--why", "x"]) == 2  # too short for a prefix
    assert not (run / "review.jsonl").exists()
    with pytest.raises(review_ledger.ReviewError, match="run directory not found"):
        review_ledger.promote(run / "nope", ["x"], why="x")


def test_load_run_is_one_frame_with_review_applied(run):
    rejected = ids(run, "rejected.jsonl")
    review_ledger.promote(run, [rejected["p6"]], why="fine")
    frame = review.load_run(run)
    assert len(frame) == 9
    assert list(frame.columns[:6]) == ["id", "status", "review", "effective_status", "rejected_by", "reason"]
    row = frame.set_index("id").loc[rejected["p6"]]
    assert (row.status, row.review, row.effective_status, row.rejected_by) == ("rejected", "promote", "accepted", "refusal")
    assert row.reason.startswith("refusal") and row.prompt == "question 6" and row.completion == MARKUP
    assert row["attr.k"] == 0 and row.attributes == {"k": 0}
    assert (frame.effective_status == "accepted").sum() == 7


def python3_kernel(tmp_path: Path, monkeypatch) -> str:
    """The python3 kernel of this interpreter; installed into a temp dir when the machine has none."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        install(prefix=str(tmp_path / "jupyter"))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    return "python3"


@pytest.mark.slow
def test_review_notebook_runs_top_to_bottom_and_promotes(run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "review_rejected.ipynb", as_version=4)
    target = ids(run, "rejected.jsonl")["p0"]
    # what a reviewer does: put an id into the promote cell
    promote_cells = [c for c in notebook.cells if c.cell_type == "code" and c.source.startswith("PROMOTE = []")]
    assert len(promote_cells) == 1
    promote_cells[0].source = promote_cells[0].source.replace("PROMOTE = []", f"PROMOTE = [{target[:10]!r}]", 1)
    monkeypatch.setenv("APPRENTICE_RUN", str(run))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks the inline backend: the chart is a PNG
    client = NotebookClient(notebook, kernel_name=python3_kernel(tmp_path, monkeypatch), timeout=120,
                            resources={"metadata": {"path": str(REPO)}})
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{run}: 6 accepted, 3 rejected, 0 reviewed" in text
    assert f"promoted 1: {target}" in text and "the trainer will use 7 samples" in text
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "[bold red]that[/] [link=x]" in html and "&#x27;" in html  # model text escaped in the HTML table
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the bar chart
    assert read_jsonl(run / "review.jsonl")[0]["id"] == target
