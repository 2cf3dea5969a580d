"""`sft sweep` on the task: the sweep section, the settings each trial trains with, the pruner, and (slow) sweeps
of a tiny random Llama scored by eval on a golden set, resumed after a clean stop and after `kill -9`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_tiny_llama

from apprentice.errors import RecipeError
from eval.config import EvalConfig
from sft.config import SFTConfig, validate_sft_section
from sft.sweep import PruneOnHeldOutLoss, best_recipe, check_sweep, run_sweep, settings_key, trial_config
from sft.sweep_config import SweepSettings
from test_sft import sft_section, upper_task, write_run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def answer_length(answer: str, item) -> float:
    """A verifier that tells trials apart even when a random model gets nothing right: longer is better."""
    return min(1.0, len(answer) / 12)


def sweep_section(**extra) -> dict:
    section = {"trials": 3, "fraction": 0.5, "objective": "eval", "prune": False,
               "space": {"learning_rate": [1e-3, 1e-2, 5e-2]}}
    section.update(extra)
    return section


def eval_section(golden: Path, student: Path, output_dir: Path, **extra) -> dict:
    section = {
        "output_dir": str(output_dir), "golden": [str(golden)], "params": {"temperature": 0, "max_tokens": 4},
        "bootstrap": 100, "perf_prompts": 2,
        "models": [{"name": "teacher", "role": "teacher", "provider": "local", "model": str(student)},
                   {"name": "student", "role": "student", "provider": "local", "model": "to/be/trained/merged"}],
    }
    section.update(extra)
    return section


def write_golden(path: Path, count: int = 4) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, (question, answer) in enumerate(upper_task(count, seed=7)):
            handle.write(json.dumps({"id": f"g{i}", "prompt": question, "reference": answer}) + "\n")
    return path


# ---- the section and the trial settings (fast) ---------------------------------------------------------
def test_sweep_section_errors_name_their_keys():
    with pytest.raises(RecipeError) as caught:
        validate_sft_section({"data": ["x"], "sweep": {"trials": 0, "space": {}}})
    message = str(caught.value)
    assert "sft.sweep.trials" in message, message
    assert "name at least one setting to vary" in message, message
    with pytest.raises(RecipeError, match="must be below high"):
        validate_sft_section({"data": ["x"], "sweep": {"space": {"learning_rate": {"low": 1e-3, "high": 1e-4}}}})
    with pytest.raises(RecipeError, match="log: true needs low > 0"):
        validate_sft_section({"data": ["x"], "sweep": {"space": {"alpha": {"low": 0, "high": 1, "log": True}}}})
    with pytest.raises(RecipeError, match=r"sft\.sweep\.space\.temprature"):
        validate_sft_section({"data": ["x"], "sweep": {"space": {"temprature": [1, 2]}}})


def test_a_sweep_that_cannot_run_says_why_before_any_model_loads():
    config = SFTConfig(data=["x"], held_out=0.0)
    settings = SweepSettings(space={"temperature": [1, 2], "method": ["sft", "on-policy"]})
    with pytest.raises(RecipeError) as caught:
        check_sweep(config, settings, None)
    message = str(caught.value)
    assert "sft.sweep.space.method: ['on-policy']" in message, message
    assert "sft.held_out is 0" in message, message
    assert "the recipe has none: add one, or set sft.sweep.objective: held_out_loss" in message, message
    plain = SweepSettings(space={"alpha": [0.5]}, objective="held_out_loss", prune=False)
    with pytest.raises(RecipeError, match="sft.sweep.space.alpha varies sft.distill.alpha: add sft.distill"):
        check_sweep(SFTConfig(data=["x"]), plain, None)
    check_sweep(SFTConfig(data=["x"]), plain.model_copy(update={"space": plain.space.model_copy(
        update={"method": ["distill"]})}), None)  # distill among the methods: alpha has something to vary


def test_trial_settings_reach_the_sft_config_and_the_best_recipe():
    config = SFTConfig(data=["runs/demo"], output_dir="runs/sft", lora={"r": 16, "alpha": 32},
                       distill={"alpha": 0.8, "temperature": 2.0},
                       sweep=SweepSettings(space={"lora_r": [4, 8]}))
    one = trial_config(config, {"learning_rate": 1e-3, "lora_r": 4, "temperature": 4.0, "student": "s"}, Path("t"))
    assert (one.learning_rate, one.lora.r, one.lora.alpha, one.student) == (1e-3, 4, 8, "s"), "lora.alpha keeps alpha/r"
    assert one.distill.temperature == 4.0 and one.distill.alpha == 0.8 and one.sweep is None
    plain = trial_config(config, {"method": "sft", "temperature": 4.0}, Path("t"))
    assert plain.distill is None, "method sft trains without the KL term"
    other_t = trial_config(config, {"method": "sft", "temperature": 8.0}, Path("u"))
    assert settings_key(plain) == settings_key(other_t), "a temperature plain SFT ignores must not make a new trial"
    assert settings_key(plain) != settings_key(one)

    recipe = {"factory": {"output_dir": "runs/demo"},
              "sft": {"data": ["runs/demo"], "output_dir": "runs/sft", "lora": {"r": 16, "alpha": 32},
                      "distill": {"alpha": 0.8, "temperature": 2.0}, "sweep": {"space": {"lora_r": [4, 8]}}}}
    best = yaml.safe_load(best_recipe(recipe, config, {"learning_rate": 1e-3, "lora_r": 8, "temperature": 4.0}))
    assert "sweep" not in best["sft"] and best["factory"] == recipe["factory"]
    assert best["sft"]["distill"] == {"alpha": 0.8, "temperature": 4.0}
    assert best["sft"]["lora"] == {"r": 8, "alpha": 16} and best["sft"]["learning_rate"] == 1e-3
    assert validate_sft_section(best["sft"]).output_dir == Path("runs/sft"), "the full run keeps the recipe's output"
    assert "distill" not in yaml.safe_load(best_recipe(recipe, config, {"method": "sft"}))["sft"]


def test_the_pruner_stops_a_trial_whose_held_out_loss_is_above_the_median():
    import optuna
    from transformers import TrainerControl, TrainerState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for loss in (1.0, 1.2):  # two earlier trials; the study maximizes, so losses are reported negated
        study.add_trial(optuna.trial.create_trial(value=0.5, intermediate_values={2: -loss}))
    good, bad = study.ask(), study.ask()
    state, control = TrainerState(global_step=2), TrainerControl()
    keeps = PruneOnHeldOutLoss(good, maximize=True)
    keeps.on_evaluate(None, state, control, metrics={"eval_loss": 0.9})
    assert not control.should_training_stop, "a loss below the median goes on"
    keeps.on_train_end(None, state, control)
    stops = PruneOnHeldOutLoss(bad, maximize=True)
    stops.on_evaluate(None, state, control, metrics={"eval_loss": 3.0})
    assert control.should_training_stop, "a loss above the median stops the training"
    with pytest.raises(optuna.TrialPruned, match="step 2"):
        stops.on_train_end(None, state, control)
    stops.on_log(None, state, control, logs={})  # every other event is a no-op


def test_trials_rank_by_score_then_by_held_out_loss_and_pruned_ones_last():
    from sft.sweep import _ranked

    rows = [{"trial": 0, "value": 0.5, "eval_loss": 1.0}, {"trial": 1, "value": None, "eval_loss": 0.1},
            {"trial": 2, "value": 0.5, "eval_loss": 0.8}, {"trial": 3, "value": 0.7, "eval_loss": 2.0}]
    assert [r["trial"] for r in _ranked(rows, maximize=True)] == [3, 2, 0, 1]
    assert [r["trial"] for r in _ranked(rows, maximize=False)] == [2, 0, 3, 1], "a loss objective: lowest first"


def test_a_resumed_sweep_draws_new_settings_not_the_first_runs_again(tmp_path):
    from rich.console import Console

    from sft.sweep import _open_study

    settings = SweepSettings(trials=20, space={"learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
                                               "temperature": [1.0, 2.0, 4.0, 8.0]})
    quiet = Console(file=open(os.devnull, "w"))
    first = _open_study(tmp_path, settings, 0, True, quiet)
    drawn = []
    for _ in range(3):
        trial = first.ask()
        drawn.append((trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
                      trial.suggest_categorical("temperature", [1.0, 2.0, 4.0, 8.0])))
        first.tell(trial, 0.5)
    again = _open_study(tmp_path, settings, 0, True, quiet)  # the sweep run again after a kill
    trial = again.ask()
    assert trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True) not in [lr for lr, _ in drawn]


def test_a_checkpoint_cut_off_mid_save_is_not_resumed_from(tmp_path):
    from sft.train import last_checkpoint

    assert last_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10", "numeric order, complete ones only"


# ---- sweeps of a tiny random Llama (slow) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    student = build_tiny_llama(root / "tiny")
    run = write_run(root / "run", upper_task(24))
    golden = write_golden(root / "golden.jsonl")
    return root, student, run, golden


@pytest.mark.slow
def test_a_sweep_ranks_trials_by_golden_set_score_writes_the_best_recipe_and_resumes(tiny_sweep, tmp_path):
    _, student, run, golden = tiny_sweep
    section = sft_section(student, [run], tmp_path / "sft", sweep=sweep_section())
    config = SFTConfig(**section)
    eval_config = EvalConfig(**eval_section(golden, student, tmp_path / "eval", verifier="test_sweep:answer_length",
                                            metrics=["verifier"]))
    recipe = {"sft": section, "eval": eval_section(golden, student, tmp_path / "eval")}
    result = run_sweep(config, config.sweep, eval_config=eval_config, recipe=recipe)

    rows = result.rows
    assert [row["state"] for row in rows] == ["complete"] * 3
    assert sorted(row["params"]["learning_rate"] for row in rows) == [1e-3, 1e-2, 5e-2], "a grid: each value once"
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True), f"ranked by score, best first: {scores}"
    assert len(set(scores)) == 3, f"the verifier tells the trials apart, so the order means something: {scores}"
    assert all(row["eval_loss"] is not None and row["retention"] is not None for row in rows), rows
    reference = json.loads((result.root / "reference.json").read_text())["score"]
    assert rows[0]["retention"] == pytest.approx(rows[0]["score"] / reference)
    trial_dir = Path(rows[0]["dir"])
    assert (trial_dir / "adapter").is_dir() and not (trial_dir / "merged").exists(), "the merged copy is removed"
    results = json.loads((trial_dir / "eval" / "results.json").read_text())
    assert results["models"]["student"]["metrics"]["overall"]["mean"] == rows[0]["score"]
    assert json.loads((trial_dir / "lineage.json").read_text())["splits"]["train"] == 9, "half of 18 training samples"

    best = yaml.safe_load((result.root / "best.yaml").read_text())
    assert best["sft"]["learning_rate"] == rows[0]["params"]["learning_rate"] and "sweep" not in best["sft"]
    assert best["eval"] == recipe["eval"]
    table = (result.root / "sweep.md").read_text()
    assert "| learning_rate | score | retention | held-out loss |" in table
    assert f"| {rows[0]['trial']} (best) |" in table
    assert (result.root / "sweep.png").stat().st_size > 1000

    # Run again with one more trial: the three finished ones are not trained again. The grid is spent, so the
    # fourth trial draws settings trained before and reads their result.
    stamps = {row["dir"]: (Path(row["dir"]) / "trial.json").stat().st_mtime_ns for row in rows}
    again = run_sweep(config, config.sweep.model_copy(update={"trials": 4}), eval_config=eval_config, recipe=recipe)
    assert len(again.rows) == 4
    assert {row["dir"]: (Path(row["dir"]) / "trial.json").stat().st_mtime_ns for row in rows} == stamps
    assert len(list(result.root.glob("trial-*"))) == 3, "settings drawn twice are trained once"

    changed = config.sweep.model_copy(update={"trials": 5, "space": config.sweep.space.model_copy(
        update={"learning_rate": [1e-3, 1e-2]})})
    with pytest.raises(RecipeError, match=r"sft.sweep.space.learning_rate changed since the sweep in .* began "
                                          r"\(its trials drew from \[0.001, 0.01, 0.05\]\)"):
        run_sweep(config, changed, eval_config=eval_config, recipe=recipe)


@pytest.mark.slow
def test_a_trial_whose_held_out_loss_runs_above_the_median_is_pruned_and_saves_its_steps(tiny_sweep, tmp_path):
    _, student, run, _ = tiny_sweep
    section = sft_section(student, [run], tmp_path / "sft", max_steps=6, eval_every_steps=2, sweep=sweep_section(
        objective="held_out_loss", prune=True, prune_after_trials=1, space={"learning_rate": [1e-2, 3.0, 1e-3]}))
    config = SFTConfig(**section)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The reported value is ignored")  # a step reported twice
        rows = {row["params"]["learning_rate"]: row for row in run_sweep(config, config.sweep).rows}
    diverged = rows[3.0]
    assert diverged["state"] == "pruned", rows
    assert diverged["steps"] < 6 and diverged["eval_loss"] > min(r["eval_loss"] for r in rows.values()), diverged
    assert not (Path(diverged["dir"]) / "lineage.json").exists(), "a pruned trial skips its final save"
    assert [r["state"] for r in rows.values() if r is not diverged] == ["complete", "complete"]
    table = (tmp_path / "sft" / "sweep" / "sweep.md").read_text()
    assert "| pruned |" in table and "score" not in table.split("\n")[4], "no score column without eval"


@pytest.mark.slow
def test_held_out_loss_objective_and_the_temperatures_cli(tiny_sweep, tmp_path, capsys):
    from transformers import AutoTokenizer

    from sft.__main__ import main
    from sft.train import find_students
    from test_kd import distill_config, write_distill_run

    _, student, _, _ = tiny_sweep
    run = write_distill_run(tmp_path / "run", AutoTokenizer.from_pretrained(student), str(student), count=24)
    config = distill_config(student, run, tmp_path / "sft", max_steps=2, eval_every_steps=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sft": json.loads(config.model_dump_json())}))
    assert main(["sweep", str(recipe), "--temperatures", "1,4", "--fraction", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "objective held_out_loss" in err and "best.yaml" in err, err
    data = json.loads((tmp_path / "sft" / "sweep" / "sweep.json").read_text())
    losses = [row["eval_loss"] for row in data["trials"]]
    assert losses == sorted(losses) and len(losses) == 2, "ranked by held-out loss, lowest first"
    best = yaml.safe_load((tmp_path / "sft" / "sweep" / "best.yaml").read_text())
    assert best["sft"]["distill"]["temperature"] == data["trials"][0]["params"]["temperature"]
    students = find_students(tmp_path)
    assert sorted(s["distill"] for s in students) == ["alpha=0.5 T=1.0", "alpha=0.5 T=4.0"], students
    assert all(Path(s["output_dir"]).name.startswith("trial-") for s in students), students
    assert main(["list", str(tmp_path)]) == 0 and "students under" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_resumes_without_retraining_finished_trials(tiny_sweep, tmp_path):
    _, student, run, golden = tiny_sweep
    section = sft_section(student, [run], tmp_path / "sft", max_steps=24, eval_every_steps=2,
                          sweep=sweep_section(space={"learning_rate": [1e-3, 1e-2]}, trials=2))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sft": section, "eval": eval_section(golden, student, tmp_path / "eval")}))
    root = tmp_path / "sft" / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sft", "sweep", str(recipe)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done: list[Path] = []
    try:
        deadline = time.monotonic() + 240
        # The first trial has finished and the second has written a whole checkpoint: kill it there.
        while time.monotonic() < deadline and process.poll() is None:
            done = list(root.glob("trial-*/trial.json"))
            started = [d for d in root.glob("trial-*/checkpoints/checkpoint-*/trainer_state.json")
                       if not (d.parents[2] / "trial.json").exists()]
            if done and started:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    finished = done[0].parent
    stamp = (finished / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    config = validate_sft_section(section)
    eval_config = EvalConfig(**eval_section(golden, student, tmp_path / "eval"))
    result = run_sweep(config, config.sweep, eval_config=eval_config)
    assert [row["state"] for row in result.rows] == ["complete", "complete"]
    assert (finished / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp, "not retrained"
    interrupted = next(Path(row["dir"]) for row in result.rows if Path(row["dir"]) != finished)
    lineage = json.loads((interrupted / "lineage.json").read_text())
    assert lineage["resumed_from"], "the interrupted trial continued from its checkpoint"


@pytest.mark.slow
def test_a_sweep_over_two_base_models_trains_each_on_its_own_base_and_names_the_winner(tiny_sweep, tmp_path):
    root, small, run, golden = tiny_sweep
    large = build_tiny_llama(root / "tiny-large", seed=1, hidden_size=96, layers=3)
    section = sft_section(small, [run], tmp_path / "sft", sweep=sweep_section(
        trials=2, space={"student": [str(small), str(large)]}))
    config = SFTConfig(**section)
    eval_config = EvalConfig(**eval_section(golden, small, tmp_path / "eval", verifier="test_sweep:answer_length",
                                            metrics=["verifier"]))
    recipe = {"sft": section, "eval": eval_section(golden, small, tmp_path / "eval")}
    result = run_sweep(config, config.sweep, eval_config=eval_config, recipe=recipe)

    rows = result.rows
    assert [row["state"] for row in rows] == ["complete", "complete"], rows
    assert sorted(row["params"]["student"] for row in rows) == sorted([str(small), str(large)]), "a grid: each once"
    parameters = {}
    for row in rows:
        base, trial_dir = row["params"]["student"], Path(row["dir"])
        adapter = json.loads((trial_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == base, f"{trial_dir} trained on {adapter['base_model_name_or_path']}"
        lineage = json.loads((trial_dir / "lineage.json").read_text())
        assert lineage["base_model"]["name"] == base, lineage["base_model"]
        assert row["score"] is not None and row["eval_loss"] is not None, row
        scored = json.loads((trial_dir / "eval" / "results.json").read_text())["models"]["student"]
        assert scored["metrics"]["overall"]["mean"] == row["score"], "the score is the trial's own eval"
        parameters[base] = scored["perf"]["parameters"]
    assert parameters[str(large)] > 2 * parameters[str(small)], f"each trial's eval ran its own base: {parameters}"

    table = (result.root / "sweep.md").read_text()
    assert "| trial | student | score | retention |" in table, table
    for row in rows:
        mark = " (best)" if row is rows[0] else ""
        assert f"| {row['trial']}{mark} | {row['params']['student']} |" in table, table
    best = yaml.safe_load((result.root / "best.yaml").read_text())
    assert best["sft"]["student"] == rows[0]["params"]["student"], "best.yaml trains the winning base"
    assert validate_sft_section(best["sft"]).student == rows[0]["params"]["student"]
