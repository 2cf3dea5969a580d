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

from .card import check_repo, push_student, write_cards
from .config import SFTConfig, load_sft_config
from .train import find_students, sweep, train


def train_or_sweep(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        config = load_sft_config(args.recipe, args.set)
        this = command_line(args.launcher, "sft", args.command, args.recipe)
        if args.command == "sweep":
            temperatures = _temperatures(args.temperatures)
            if not 0 < args.fraction <= 1:
                raise RecipeError(f"--fraction {args.fraction}: expected a share of the training data in (0, 1]")
            console.print(f"[bold]{escape(this)}[/]: T in {temperatures}, fraction {args.fraction:g}", highlight=False)
            console.detail_json(config.model_dump(mode="json"))
            sweep(config, temperatures, fraction=args.fraction, console=console)
            console.final(f"next: set sft.distill.temperature to the best T in {escape(str(config.output_dir))}"
                          f"/sweep/sweep.md, then {escape(command_line(args.launcher, 'sft', 'train', args.recipe))}",
                          highlight=False)
            return 0
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
    for name in ("output", "base model", "data runs", "date", "steps", "eval loss", "distill"):
        table.add_column(name)
    for s in students:
        loss = "—" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        cells = [s["output_dir"], str(s["base_model"]), ", ".join(map(str, s["data"])), str(s["date"] or "—"),
                 str(s["steps"]), loss, s["distill"] or "—"]
        table.add_row(*(escape(str(cell)) for cell in cells))
    console.print(table)
    return 0


COMMANDS = {"train": train_or_sweep, "sweep": train_or_sweep, "list": list_students, "card": card_command}
