"""`sft sweep`: short training runs over the settings of `sft.sweep.space`, judged on the task.

Optuna runs it: TPE draws the next trial's settings (a grid when every parameter is a list that the trials
cover), the MedianPruner stops a trial whose held-out loss, reported at each evaluation step, is worse than
the median of earlier trials at that step, and the study lives in OUTPUT_DIR/sweep/optuna.db (SQLite), so a
killed sweep run again keeps its finished trials and only runs the rest. Each trial trains on
`sft.sweep.fraction` of the training split, into OUTPUT_DIR/sweep/trial-<hash of its settings>/ (a trial
interrupted mid-run resumes from its checkpoint; settings drawn twice are trained once), and is scored by
`eval` on the recipe's golden sets (the student's overall score, the number the gate reads); its held-out
loss is kept beside it. Written at the end of every trial:

    sweep.md    the trials, best first
    sweep.json  the same as data
    best.yaml   the recipe with the best trial's settings, sft.sweep removed: ready for a full `sft train`
    sweep.png   the score against each parameter
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from apprentice.errors import RecipeError
from eval.config import EvalConfig, ModelConfig
from eval.run import evaluate

from .config import DistillSettings, OnPolicySettings, SFTConfig
from .sweep_config import SweepRange, SweepSettings, SweepSpace
from .train import last_checkpoint, output_lock, train

DISTILL_KEYS = ("temperature", "alpha")
STUDY = "sweep"


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    root: Path


def settings_for_temperatures(temperatures: list[float], fraction: float) -> SweepSettings:
    """The old `sft sweep --temperatures 1,2,4`: one trial per temperature, ranked by held-out loss."""
    return SweepSettings(trials=len(temperatures), fraction=fraction, objective="held_out_loss", prune=False,
                         space=SweepSpace(temperature=temperatures))


def run_sweep(config: SFTConfig, settings: SweepSettings, *, eval_config: EvalConfig | None = None,
              recipe: dict[str, Any] | None = None, console: Any = None) -> SweepResult:
    """The sweep, holding OUTPUT_DIR/sweep's lock (each trial's run holds its own as well). `recipe` is the
    recipe file's data, for best.yaml (without it, best.yaml holds the sft section only)."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    check_sweep(config, settings, eval_config)
    root = Path(config.output_dir) / "sweep"
    with output_lock(root, "sft.output_dir"):
        return _run_sweep(config, settings, eval_config, recipe, console, root)


# sft.method's values; `distill` is the sweep's older name for kd.
METHODS = {"sft", "kd", "distill", "on_policy"}


def check_sweep(config: SFTConfig, settings: SweepSettings, eval_config: EvalConfig | None) -> None:
    """Every reason the sweep cannot run, before any model loads."""
    space = settings.space.chosen()
    problems = []
    methods = set(space.get("method") or [])
    if methods - METHODS:
        problems.append(f"sft.sweep.space.method: {sorted(methods - METHODS)}: expected sft, kd (or distill) or "
                        "on_policy")
    distilled = config.distill is not None or bool(methods & {"kd", "distill"})
    for key in DISTILL_KEYS:
        if key in space and not distilled:
            problems.append(f"sft.sweep.space.{key} varies sft.distill.{key}: add sft.distill: {{alpha: 0.8, "
                            "temperature: 2.0}, or method: [distill] to the space")
    if config.held_out <= 0 and (settings.objective == "held_out_loss" or settings.prune):
        problems.append("sft.held_out is 0: the sweep's held-out loss (its objective or its pruning) needs a "
                        "held-out split; set sft.held_out above 0")
    if settings.objective == "eval" and eval_config is None:
        problems.append("sft.sweep.objective: eval scores each trial on the golden sets of the recipe's eval: "
                        "section, and the recipe has none: add one, or set sft.sweep.objective: held_out_loss")
    if problems:
        raise RecipeError("\n".join(problems))


def trial_config(config: SFTConfig, params: dict[str, Any], output_dir: Path) -> SFTConfig:
    """The recipe's sft settings with a trial's values put in."""
    update: dict[str, Any] = {"output_dir": output_dir, "sweep": None}
    for key in ("learning_rate", "epochs", "student"):
        if key in params:
            update[key] = params[key]
    if "lora_r" in params:
        rank = int(params["lora_r"])
        update["lora"] = config.lora.model_copy(update={
            "r": rank, "alpha": max(1, round(config.lora.alpha * rank / config.lora.r))})
    distill = config.distill
    method = {"distill": "kd"}.get(params.get("method"), params.get("method"))
    if method is not None:  # the fields that go with each method, as SFTConfig's own check sets them
        update["method"] = method
        distill = (distill or DistillSettings()) if method == "kd" else None
        update["on_policy"] = (config.on_policy or OnPolicySettings()) if method == "on_policy" else None
    if distill is not None:
        distill = distill.model_copy(update={key: params[key] for key in DISTILL_KEYS if key in params})
    update["distill"] = distill
    return config.model_copy(update=update)


def settings_key(config: SFTConfig) -> str:
    """A trial's folder name: the hash of what it trains with (settings the method ignores drop out, so the
    same training drawn twice is done once)."""
    data = config.model_dump(mode="json", exclude={"output_dir", "sweep"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


class PruneOnHeldOutLoss:
    """A Trainer callback (duck-typed, as sft/progress.py's): reports each held-out loss to the Optuna trial
    and, when the pruner says so, ends the training at once and raises TrialPruned from `on_train_end`, after
    the progress bar has closed, so that the pruned run skips its final evaluation and its save."""

    def __init__(self, trial: Any, maximize: bool) -> None:
        self.trial = trial
        self.sign = -1.0 if maximize else 1.0  # the study maximizes a score: a lower loss must rank higher
        self.pruned_at: int | None = None
        self.reported: set[int] = set()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is None or state.global_step in self.reported:  # train()'s final evaluate repeats the last step
            return
        self.reported.add(state.global_step)
        self.trial.report(self.sign * float(loss), state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pruned_at is not None:
            import optuna

            raise optuna.TrialPruned(f"held-out loss above the median at step {self.pruned_at}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _suggest(trial: Any, space: dict[str, list | SweepRange]) -> dict[str, Any]:
    params = {}
    for name, values in space.items():
        if isinstance(values, SweepRange):
            params[name] = trial.suggest_float(name, values.low, values.high, log=values.log)
        else:
            params[name] = trial.suggest_categorical(name, values)
    return params


def _sampler(settings: SweepSettings, seed: int) -> Any:
    """A grid when every parameter is a list and the trials cover every combination; TPE otherwise."""
    import optuna

    space = settings.space.chosen()
    if all(isinstance(values, list) for values in space.values()):
        combinations = 1
        for values in space.values():
            combinations *= len(values)
        if combinations <= settings.trials:
            return optuna.samplers.GridSampler(space, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _open_study(root: Path, settings: SweepSettings, seed: int, maximize: bool, console: Any) -> Any:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    root.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(root / 'optuna.db').resolve()}")
    direction = "maximize" if maximize else "minimize"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=settings.prune_after_trials) if settings.prune
              else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=_sampler(settings, seed), pruner=pruner,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise RecipeError(f"{root / 'optuna.db'} holds a sweep that {study.direction.name.lower()}s; this one "
                          f"{direction}s (sft.sweep.objective {settings.objective}): choose another sft.output_dir")
    _check_same_space(study, settings, root)
    # A resumed sweep must not replay the draws of the first run: the seeded sampler starts again from its seed,
    # and TPE's first trials are random draws, so the same seed would propose the finished trials' settings
    # again (seen in benchmarks/sweep.py). Offset by the trials already in the study: reproducible, and new.
    study.sampler = _sampler(settings, seed + len(study.get_trials(deepcopy=False)))
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # We hold the sweep's lock: a trial still marked running was killed. It fails, and its settings run
        # again first (their folder has its checkpoints, so the training resumes there).
        storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)  # optuna keeps the id private
        study.enqueue_trial(frozen.params, skip_if_exists=False)
        console.print(f"[bold]sweep[/] trial {frozen.number} was interrupted: it runs again", highlight=False)
    return study


def _distributions(settings: SweepSettings) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {name: FloatDistribution(values.low, values.high, log=values.log) if isinstance(values, SweepRange)
            else CategoricalDistribution(values) for name, values in settings.space.chosen().items()}


def _check_same_space(study: Any, settings: SweepSettings, root: Path) -> None:
    """A resumed sweep must draw from the space its trials were drawn from (Optuna refuses a list of values
    that changed): said with the key before anything trains."""
    from optuna.distributions import check_distribution_compatibility

    now = _distributions(settings)
    for trial in study.get_trials(deepcopy=False):
        for name, before in trial.distributions.items():
            if name not in now:
                continue
            try:
                check_distribution_compatibility(before, now[name])
            except ValueError:
                raise RecipeError(
                    f"sft.sweep.space.{name} changed since the sweep in {root} began (its trials drew from "
                    f"{_shown(before)}): put it back to resume, or choose another sft.output_dir") from None


def _shown(distribution: Any) -> str:
    if hasattr(distribution, "choices"):
        return str(list(distribution.choices))
    return f"{{low: {distribution.low:g}, high: {distribution.high:g}, log: {str(distribution.log).lower()}}}"


def _run_sweep(config: SFTConfig, settings: SweepSettings, eval_config: EvalConfig | None,
               recipe: dict[str, Any] | None, console: Any, root: Path) -> SweepResult:
    from optuna.trial import TrialState

    maximize = settings.objective == "eval"
    seed = config.seed if settings.seed is None else settings.seed
    study = _open_study(root, settings, seed, maximize, console)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    remaining = settings.trials - len(finished)
    console.print(f"[bold]sweep[/] {len(finished)} trial(s) done before, {max(0, remaining)} to run; "
                  f"objective {settings.objective}, {settings.fraction:g} of the training data each", highlight=False)
    reference = _reference_score(eval_config, root, console) if maximize else None
    space = settings.space.chosen()

    def objective(trial: Any) -> float:
        params = _suggest(trial, space)
        one = trial_config(config, params, root / "pending")
        run_dir = root / f"trial-{settings_key(one)}"
        one = one.model_copy(update={"output_dir": run_dir})
        trial.set_user_attr("dir", str(run_dir))
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        outcome = _read_outcome(run_dir)
        if outcome is not None:
            console.print(f"[bold]sweep[/] trial {trial.number} ({escape(shown)}): trained before, read from "
                          f"{escape(str(run_dir))}", highlight=False)
        else:
            console.print(f"[bold]sweep[/] trial {trial.number} ({escape(shown)}) → {escape(str(run_dir))}",
                          highlight=False)
            outcome = _run_trial(one, settings, trial, maximize, eval_config, run_dir, console)
        for key in ("eval_loss", "score", "steps", "train_s", "eval_s"):
            trial.set_user_attr(key, outcome.get(key))
        value = outcome["score"] if maximize else outcome["eval_loss"]
        if value is None:
            raise RecipeError(f"trial {trial.number}: no {settings.objective} to rank it by (see {run_dir})")
        return value

    def written(study: Any, trial: Any) -> None:
        _write_outputs(study, settings, config, recipe, reference, root, console, final=False)

    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[written], gc_after_trial=True)
    return _write_outputs(study, settings, config, recipe, reference, root, console, final=True)


def _read_outcome(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "trial.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _run_trial(one: SFTConfig, settings: SweepSettings, trial: Any, maximize: bool,
               eval_config: EvalConfig | None, run_dir: Path, console: Any) -> dict[str, Any]:
    callbacks = [PruneOnHeldOutLoss(trial, maximize)] if settings.prune else []
    started = time.monotonic()
    resume = last_checkpoint(run_dir / "checkpoints") is not None
    import optuna

    try:
        result = train(one, resume=resume, console=console, fraction=settings.fraction, export_merged=maximize,
                       callbacks=callbacks)
    except optuna.TrialPruned:
        trial.set_user_attr("train_s", round(time.monotonic() - started, 2))  # what the steps it ran took
        raise
    outcome: dict[str, Any] = {"eval_loss": result.metrics.get("eval_loss"), "steps": result.global_step,
                               "train_s": round(time.monotonic() - started, 2), "score": None, "eval_s": None}
    if maximize and eval_config is not None:
        began = time.monotonic()
        outcome["score"] = _score(eval_config, run_dir, console)
        outcome["eval_s"] = round(time.monotonic() - began, 2)
        # A merged copy per trial is a whole model (6 GB for a 3B student); the adapter stays.
        shutil.rmtree(run_dir / "merged", ignore_errors=True)
    (run_dir / "trial.json").write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")
    return outcome


def _student_model(eval_config: EvalConfig, path: Path) -> ModelConfig:
    """The eval section's student, pointed at a trial's merged model (run in-process)."""
    name = eval_config.student_name()
    student = next(model for model in eval_config.models if model.name == name)
    if student.provider == "local":
        return student.model_copy(update={"model": str(path)})
    params = student.params if "params" in student.model_fields_set else dict(eval_config.params)
    return ModelConfig(name=name, role="student", provider="local", model=str(path), params=params)


def _trial_eval(eval_config: EvalConfig, models: list[ModelConfig], student: str, output_dir: Path) -> EvalConfig:
    judge = eval_config.judge
    if judge is not None:
        judge = judge.model_copy(update={"pairwise": False}) if judge.rubric else None
    # Scores only: no timing or throughput pass (a hosted reference's would be paid), no gate, no pairwise
    # judging, nothing that needs a second model.
    return eval_config.model_copy(update={
        "models": models, "student": student, "reference": None, "gate": None, "judge": judge, "perf_prompts": 0,
        "timed_requests": 0, "served_concurrency": 0, "output_dir": output_dir, "cascade": False,
        "speculative": False})


def _overall(summary: dict[str, Any], name: str) -> float:
    return float(summary["models"][name]["metrics"]["overall"]["mean"])


def _score(eval_config: EvalConfig, run_dir: Path, console: Any) -> float:
    student = _student_model(eval_config, run_dir / "merged")
    summary, _ = evaluate(_trial_eval(eval_config, [student], student.name, run_dir / "eval"), console)
    return _overall(summary, student.name)


def _reference_score(eval_config: EvalConfig | None, root: Path, console: Any) -> float | None:
    """The reference model's score, measured once per sweep, for each trial's retention."""
    name = eval_config.reference_name() if eval_config is not None else None
    if eval_config is None or name is None:
        return None
    path = root / "reference.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["score"]
    console.print(f"[bold]sweep[/] scoring the reference model {escape(name)} once, for retention", highlight=False)
    model = next(model for model in eval_config.models if model.name == name)
    summary, _ = evaluate(_trial_eval(eval_config, [model], name, root / "reference-eval"), console)
    score = _overall(summary, name)
    path.write_text(json.dumps({"name": name, "score": score}) + "\n", encoding="utf-8")
    return score


# ---- outputs ------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(study: Any, reference: float | None) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = dict(trial.user_attrs)
        if trial.state == TrialState.PRUNED and trial.intermediate_values:  # its last reported held-out loss
            attrs["steps"] = max(trial.intermediate_values)
            attrs["eval_loss"] = abs(trial.intermediate_values[attrs["steps"]])
        score = attrs.get("score")
        rows.append({"trial": trial.number, "state": trial.state.name.lower(), "params": dict(trial.params),
                     "score": score, "retention": score / reference if score is not None and reference else None,
                     "eval_loss": attrs.get("eval_loss"), "steps": attrs.get("steps"), "train_s": attrs.get("train_s"),
                     "eval_s": attrs.get("eval_s"), "dir": attrs.get("dir"),
                     "trial_s": (trial.datetime_complete - trial.datetime_start).total_seconds()
                     if trial.datetime_complete and trial.datetime_start else None,
                     "value": trial.value if trial.state == TrialState.COMPLETE else None})
    return rows


def _ranked(rows: list[dict[str, Any]], maximize: bool) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple:
        # Equal scores (a small golden set, or short trials that all score 0) go by held-out loss, lower first.
        value, loss = row["value"], row["eval_loss"] if row["eval_loss"] is not None else float("inf")
        if value is None:
            return (1, 0.0, loss, row["trial"])
        return (0, -value if maximize else value, loss, row["trial"])

    return sorted(rows, key=key)


def _write_outputs(study: Any, settings: SweepSettings, config: SFTConfig, recipe: dict[str, Any] | None,
                   reference: float | None, root: Path, console: Any, *, final: bool) -> SweepResult:
    maximize = settings.objective == "eval"
    rows = _ranked(_rows(study, reference), maximize)
    best = rows[0] if rows and rows[0]["value"] is not None else None
    names = list(settings.space.chosen())
    scored = ["score", "retention"] if maximize else []
    header = ["trial", *names, *scored, "held-out loss", "steps", "train s", *(["eval s"] if maximize else []), "state"]
    ranked_by = ("the student's overall score on the golden sets (the gate's score; higher is better), equal "
                 "scores by held-out loss" if maximize
                 else "held-out loss: cross-entropy of the teacher's completions on the held-out split (lower is better)")
    lines = [f"# Sweep: {settings.trials} trial(s), {settings.fraction:g} of the training data each", "",
             f"Ranked by {ranked_by}." + (" Held-out loss is kept beside the score." if maximize else "")
             + " Pruned trials stopped early (held-out loss above the median of earlier trials at the same step)"
             + (" and have no score." if maximize else "; their loss is the last one reported."), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mark = " (best)" if row is best else ""
        retention = "—" if row["retention"] is None else f"{100 * row['retention']:.1f} %"
        cells = [f"{row['trial']}{mark}", *(_fmt(row["params"].get(name)) for name in names),
                 *([_fmt(row["score"]), retention] if maximize else []), _fmt(row["eval_loss"]), _fmt(row["steps"]),
                 _fmt(row["train_s"]), *([_fmt(row["eval_s"])] if maximize else []), row["state"]]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: trial {best['trial']} ({best['dir']}); its recipe: best.yaml"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "sweep.json").write_text(json.dumps({"objective": settings.objective, "reference_score": reference,
                                                 "trials": rows}, indent=2) + "\n", encoding="utf-8")
    if best is not None:
        (root / "best.yaml").write_text(best_recipe(recipe, config, best["params"]), encoding="utf-8")
    if final:
        plot = plot_sweep(rows, names, maximize, root / "sweep.png")
        console.print(escape(f"table → {root / 'sweep.md'}" + (f", best recipe → {root / 'best.yaml'}" if best else "")
                             + (f", plot → {plot}" if plot else "")), highlight=False)
    return SweepResult(rows, best, root)


def best_recipe(recipe: dict[str, Any] | None, config: SFTConfig, params: dict[str, Any]) -> str:
    """The recipe with the best trial's settings in its sft: section and no sft.sweep, as YAML."""
    data = copy.deepcopy(recipe) if recipe is not None else {"sft": config.model_dump(mode="json", exclude_defaults=True)}
    section = data.setdefault("sft", {})
    section.pop("sweep", None)
    for key in ("learning_rate", "epochs", "student"):
        if key in params:
            section[key] = params[key]
    if "lora_r" in params:
        lora = section.setdefault("lora", {})
        lora["r"], lora["alpha"] = params["lora_r"], max(1, round(config.lora.alpha * params["lora_r"] / config.lora.r))
    method = {"distill": "kd"}.get(params.get("method"), params.get("method"))
    if method is not None:
        section["method"] = method
        if method != "kd":
            section.pop("distill", None)
        elif not section.get("distill"):
            section["distill"] = {}
        if method != "on_policy":
            section.pop("on_policy", None)
    if section.get("distill") is not None:
        section.setdefault("distill", {}).update({key: params[key] for key in DISTILL_KEYS if key in params})
    note = "# The best trial of `sft sweep`; train it on all the data with `sft train` on this file.\n"
    return note + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def plot_sweep(rows: list[dict[str, Any]], names: list[str], maximize: bool, path: Path) -> Path | None:
    """The objective against each swept parameter, one panel each (Agg: no display)."""
    done = [row for row in rows if row["value"] is not None]
    if not done or not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), dpi=100, squeeze=False)
    label = "golden-set score" if maximize else "held-out loss"
    for axis, name in zip(axes[0], names):
        values = [row["params"].get(name) for row in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            axis.scatter(values, [row["value"] for row in done], color="tab:blue")
            if name == "learning_rate":
                axis.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            axis.scatter([labels.index(str(v)) for v in values], [row["value"] for row in done], color="tab:blue")
            axis.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        axis.set_xlabel(name)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
