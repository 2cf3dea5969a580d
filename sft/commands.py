"""The sft commands, behind the thin `python -m sft` parser (sft/__main__.py). sft.train imports torch,
transformers and TRL inside the functions that train, so importing this stays light."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apprentice.commandline import command_line
from apprentice.config import load_recipe_data
from apprentice.console import CommandConsole
from apprentice.errors import ApprenticeError, RecipeError
from eval.config import load_eval_config

from .card import check_repo, push_student, write_cards
from .config import SFTConfig, load_sft_config
from .lineage import read_lineage, verify
from .sweep import run_sweep, settings_for_temperatures
from .train import find_students, train


def train_or_sweep(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        config = load_sft_config(args.recipe, args.set)
        this = command_line(args.launcher, "sft", args.command, args.recipe)
        if args.command == "sweep":
            return _sweep(args, config, this, console)
        if args.push_to_hub:
            check_repo(args.push_to_hub)  # before hours of training, not after
        console.print(f"[bold]{escape(this)}[/] → {escape(str(config.output_dir))}", highlight=False)
        console.print(escape(describe(config)), highlight=False)
        console.detail_json(config.model_dump(mode="json"))  # -v; lineage.json keeps it too
        result = train(config, resume=args.resume, console=console)
        if args.push_to_hub:  # after training: a failed upload leaves the student and its card on disk
            _push(console, config.output_dir, args)
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return console.stopped(exc)
    evaluate = command_line(args.launcher, "eval", "run", args.recipe)
    if "eval" not in load_recipe_data(args.recipe):
        evaluate = f"add an eval: section (a model with path: {result.adapter_dir}) to {args.recipe}, then {evaluate}"
    console.final(f"next: {escape(evaluate)} (scores the student against its teacher)", highlight=False)
    return 0


def _sweep(args: argparse.Namespace, config: SFTConfig, this: str, console: CommandConsole) -> int:
    """`sft.sweep` from the recipe, or the older `--temperatures` (also what a recipe without sft.sweep gets):
    one short distillation run per temperature, ranked by held-out loss."""
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise RecipeError(f"--fraction {args.fraction}: expected a share of the training data in (0, 1]")
    if args.temperatures is not None or config.sweep is None:
        settings = settings_for_temperatures(_temperatures(args.temperatures or "1,2,4,8,16"),
                                             0.1 if args.fraction is None else args.fraction)
    else:
        settings = config.sweep if args.fraction is None else config.sweep.model_copy(update={"fraction": args.fraction})
    recipe = load_recipe_data(args.recipe, args.set)
    eval_config = load_eval_config(args.recipe, args.set) if recipe.get("eval") is not None else None
    space = ", ".join(f"{name} {values if isinstance(values, list) else values.model_dump()}"
                      for name, values in settings.space.chosen().items())
    console.print(f"[bold]{escape(this)}[/]: {settings.trials} trial(s) over {escape(space)}, "
                  f"fraction {settings.fraction:g}, objective {settings.objective}", highlight=False)
    console.detail_json(config.model_dump(mode="json"))
    result = run_sweep(config, settings, eval_config=eval_config, recipe=recipe, console=console)
    if result.best is None:
        console.final(f"no trial finished: see {escape(str(result.root / 'sweep.md'))}", highlight=False)
        return 1
    best = result.root / "best.yaml"
    console.final(f"next: {escape(command_line(args.launcher, 'sft', 'train', best))} (the best trial, "
                  f"trial {result.best['trial']}, on all the data)", highlight=False)
    return 0


def _push(console: CommandConsole, student_dir, args: argparse.Namespace) -> None:
    url = push_student(student_dir, args.push_to_hub, merged=args.merged, private=not args.public)
    console.print(escape(f"pushed {'the merged model' if args.merged else 'the adapter'} and its card to {url}"),
                  highlight=False)


def card_command(args: argparse.Namespace) -> int:
    """Rewrite a trained student's model card (with the eval table once an eval scored it); push it if asked."""
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        written = write_cards(args.student_dir, args.eval_dirs)
        table = "with" if "## Evaluation\n\nFrom " in written[0].read_text(encoding="utf-8") else "without"
        console.print(escape(f"model card ({table} an eval table) → {', '.join(str(p) for p in written)}"),
                      highlight=False)
        if args.eval_dirs and table == "without":
            console.print("[yellow]note:[/] " + escape(f"no model in {', '.join(map(str, args.eval_dirs))} is this "
                                                       "student (its path, adapter/ or merged/, and this training)"),
                          highlight=False)
        if args.push_to_hub:
            _push(console, args.student_dir, args)
    except (ApprenticeError, OSError) as exc:
        return console.stopped(exc)
    if table == "without":
        console.final(escape(f"next: score it with {command_line(args.launcher, 'eval', 'run', 'RECIPE.yaml')}, then "
                             f"{command_line(args.launcher, 'sft', 'card', args.student_dir)} again"), highlight=False)
    else:
        console.final(escape(f"card: {written[0]}"), highlight=False)
    return 0


def describe(config: SFTConfig) -> str:
    """The training in one line: student, method, data, schedule."""
    method = f"{'QLoRA' if config.qlora else 'LoRA'} r={config.lora.r} alpha={config.lora.alpha}"
    if config.distill is not None:
        method += f" + distill alpha={config.distill.alpha} T={config.distill.temperature:g}"
    if config.on_policy is not None:
        method += (f" on its own samples (on_policy beta={config.on_policy.beta:g} "
                   f"T={config.on_policy.temperature:g})")
    if config.init_from is not None:
        method += f" from {config.init_from}"
    steps = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs:g} epoch(s)"
    runs = ", ".join(str(path) for path in config.data)
    return (f"student {config.student} · {method} · lr {config.learning_rate:g} {config.lr_scheduler} · {steps} · "
            f"data {runs} ({config.held_out:.0%} held out)")


def _temperatures(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RecipeError(f"--temperatures {text!r}: expected numbers separated by commas, e.g. 1,2,4,8") from None
    if not values or any(value <= 0 for value in values):
        raise RecipeError(f"--temperatures {text!r}: expected positive numbers, e.g. 1,2,4,8")
    return values


def list_students(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    students = find_students(args.dir)
    if not students:
        console.print(f"no trained students under {escape(str(args.dir))} (looked for */lineage.json)", highlight=False)
        return 0
    table = Table(title=f"students under {escape(str(args.dir))}")
    for name in ("output", "base model", "data runs", "date", "steps", "eval loss", "distill", "score", "retention",
                 "p50 latency", "$/1k"):
        table.add_column(name)
    for s in students:
        loss = "—" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        score = "—" if s["score"] is None else f"{100 * s['score']:.1f} %"
        retention = "—" if s["retention"] is None else f"{100 * s['retention']:.1f} %"
        cells = [s["output_dir"], str(s["base_model"]), ", ".join(map(str, s["data"])), str(s["date"] or "—"),
                 str(s["steps"]), loss, s["distill"] or "—", score, retention,
                 "—" if s["latency_p50_s"] is None else f"{s['latency_p50_s']:.3f} s",
                 "—" if s["usd_per_1k_answers"] is None else f"{s['usd_per_1k_answers']:.4g}"]
        table.add_row(*(escape(str(cell)) for cell in cells))
    console.print(table)
    return 0


def show_lineage(args: argparse.Namespace) -> int:
    """A student's lineage in brief; with --verify every hash recomputed, and what changed named (exit 1)."""
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        lineage = read_lineage(args.student)
        findings = verify(args.student) if args.verify else []
    except (ApprenticeError, OSError) as exc:
        return console.stopped(exc)
    out = Console(soft_wrap=True)
    base = (lineage.get("base_model") or {}).get("name")
    out.print(escape(f"{args.student}: {base}, trained {lineage.get('started_at')}, {lineage.get('global_step')} "
                     f"steps, git {lineage.get('git_commit')}"), highlight=False)
    for run in lineage.get("data") or []:
        content = run.get("content") or {}
        out.print(escape(f"  data {run.get('path')}: {run.get('samples')} samples trained on; "
                         f"{(content.get('accepted') or {}).get('count', '?')} accepted, "
                         f"{(content.get('rejected') or {}).get('count', '?')} rejected, "
                         f"{(content.get('review') or {}).get('decisions', '?')} review decision(s)"), highlight=False)
    for entry in lineage.get("evals") or []:
        gate = entry.get("gate")
        verdict = "" if not gate else (" · gate passed" if gate["passed"] else " · gate FAILED")
        retention = "" if entry.get("retention") is None else f", retention {100 * entry['retention']:.1f} %"
        out.print(escape(f"  eval {entry.get('eval_dir')} ({entry.get('at')}): {entry.get('model_name')} scored "
                         f"{100 * entry['score']:.1f} %{retention}{verdict}"), highlight=False)
    if not args.verify:
        console.final(f"next: {escape(command_line(args.launcher, 'sft', 'lineage', args.student))} --verify "
                      "(recompute every hash)", highlight=False)
        return 0
    table = Table(title=escape(f"lineage check of {args.student}"))
    for name in ("what", "", "detail"):
        table.add_column(name)
    for finding in findings:
        table.add_row(escape(finding.what), "[red]changed[/]" if finding.changed else "[green]same[/]",
                      escape(finding.detail))
    out.print(table)
    changed = [finding for finding in findings if finding.changed]
    if changed:
        console.final(escape(f"{len(changed)} change(s) since training or eval: "
                             + "; ".join(finding.detail for finding in changed)), highlight=False)
        return 1
    console.final(f"all {len(findings)} hashes match what was recorded", highlight=False)
    return 0


COMMANDS = {"train": train_or_sweep, "sweep": train_or_sweep, "list": list_students, "lineage": show_lineage,
            "card": card_command}
