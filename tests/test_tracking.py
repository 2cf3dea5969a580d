"""The factory's and eval's figures to the trainer's tracker: tensorboard event files, read back offline."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_prompts, write_recipe
from test_eval import _eval_recipe, _responder

import apprentice_cli
from apprentice.config import load_recipe_data
from apprentice.errors import RecipeError
from eval.config import load_eval_config
from factory.recipe import load_factory_config

pytest.importorskip("tensorboard")


def read_events(folder: Path) -> tuple[dict[str, float], list[str]]:
    """Every scalar's last value by tag, and the tags of the text summaries, from the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return scalars, list(events.Tags()["tensors"])


def test_the_factorys_final_figures_go_to_tensorboard(tmp_path, server, env_key, capsys):
    """Six prompts through the fake server, two refused: the run's counts, rejections, tokens and diversity."""
    def answers(messages, index, body):
        i = int(messages[-1]["content"].split()[-1])
        return "I'm sorry, but I can't help with that." if i % 3 == 0 else f"A fine answer number {i}."

    server.config.responder = answers
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 6),
                          provider="openai", base_url=server.openai_base_url, extra="  report_to: tensorboard\n")
    assert apprentice_cli.main(["generate", str(recipe)]) == 0
    assert f"tracker: the run's figures → {run / 'tensorboard'} (tensorboard)" in capsys.readouterr().err
    scalars, _ = read_events(run / "tensorboard")
    assert scalars["factory/accepted"] == 4 and scalars["factory/rejected"] == 2 and scalars["factory/failed"] == 0
    assert scalars["factory/rejected_by/refusal"] == 2
    assert scalars["factory/acceptance_rate"] == pytest.approx(4 / 6, abs=1e-4)
    assert scalars["factory/tokens/output"] > 0 and 0 < scalars["factory/diversity/distinct_1"] <= 1


def test_evals_scores_retention_and_gate_go_to_sft_report_to(tmp_path, server, env_key, capsys):
    """No eval.report_to: the recipe's sft.report_to is taken, its tensorboard part (wandb is named as left out)."""
    server.config.responder = _responder
    recipe = _eval_recipe(tmp_path, server, "  gate: {min_retention: 0.5}\n")
    recipe.write_text(recipe.read_text() + "sft:\n  data: [runs/demo]\n  report_to: [tensorboard, wandb]\n")
    assert apprentice_cli.main(["eval", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert f"scores, retention and gate → {tmp_path / 'out' / 'tensorboard'}" in err
    assert "eval logs to tensorboard only; sft.report_to's wandb gets the trainer's figures alone" in err
    scalars, texts = read_events(tmp_path / "out" / "tensorboard")
    assert scalars["eval/student/retention"] == pytest.approx(0.5)
    assert scalars["eval/student/normalized"] == pytest.approx(0.5) and scalars["eval/teacher/overall"] == 1.0
    assert scalars["eval/student/retention_low"] <= 0.5 <= scalars["eval/student/retention_high"]
    assert scalars["eval/gate_passed"] == 1.0 and any(tag.startswith("eval/gate") for tag in texts), texts


def test_no_tracker_writes_nothing(tmp_path, server, env_key):
    server.config.responder = _responder
    recipe = _eval_recipe(tmp_path, server)
    assert apprentice_cli.main(["eval", str(recipe)]) == 0
    assert not (tmp_path / "out" / "tensorboard").exists()


@pytest.mark.parametrize("section,loader", [("factory", load_factory_config), ("eval", load_eval_config)])
def test_another_tracker_in_the_factory_or_eval_is_refused_with_its_key(tmp_path, section, loader, server):
    recipe = _eval_recipe(tmp_path, server) if section == "eval" else \
        write_recipe(tmp_path / "r.yaml", output_dir=tmp_path / "run", prompts=tmp_path / "p.jsonl",
                     provider="openai", base_url=server.openai_base_url)
    assert section in load_recipe_data(recipe)
    with pytest.raises(RecipeError, match=rf"{section}\.report_to.*wandb.*tensorboard only.*sft\.report_to"):
        loader(recipe, [f"{section}.report_to=wandb"])
