"""The sft commands, behind the thin `python -m sft` parser (sft/__main__.py). sft.train imports torch,
transformers and TRL inside the functions that train, so importing this stays light."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apprentice.errors import ApprenticeError, os_error_message, RecipeError

from .config import load_sft_config
from .train import find_students, sweep, train


def train_or_sweep(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)
    try:
        config = load_sft_config(args.recipe, args.set)
        if args.command == "sweep":
            temperatures = _temperatures(args.temperatures)
            if not 0 < args.fraction <= 1:
                raise RecipeError(f"--fraction {args.fraction}: expected a share of the training data in (0, 1]")
            console.print(f"[bold]sft sweep[/] {args.recipe}: T in {temperatures}, fraction {args.fraction:g}")
            sweep(config, temperatures, fraction=args.fraction, console=console)
            return 0
        console.print(f"[bold]sft train[/] {args.recipe} → {config.output_dir}")
        console.print_json(data=config.model_dump(mode="json"))
        train(config, resume=args.resume, console=console)
    except ApprenticeError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except OSError as exc:  # a full disk, a permission: one line naming the path
        console.print(f"[red]error:[/] {escape(os_error_message(exc))}", highlight=False)
        return 1
    return 0


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
        console.print(f"no trained students under {args.dir} (looked for */lineage.json)")
        return 0
    table = Table(title=f"students under {args.dir}")
    for name in ("output", "base model", "data runs", "date", "steps", "eval loss", "distill"):
        table.add_column(name)
    for s in students:
        loss = "—" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        table.add_row(s["output_dir"], str(s["base_model"]), ", ".join(map(str, s["data"])), str(s["date"] or "—"),
                      str(s["steps"]), loss, s["distill"] or "—")
    console.print(table)
    return 0


COMMANDS = {"train": train_or_sweep, "sweep": train_or_sweep, "list": list_students}
