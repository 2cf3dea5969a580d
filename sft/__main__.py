"""`python -m sft train|sweep|list` — thin; heavy imports happen inside the command that needs them.

    python -m sft train RECIPE.yaml [--set sft.key=value ...] [--resume]
    python -m sft sweep RECIPE.yaml --temperatures 1,2,4,8,16 --fraction 0.1 [--set ...]
    python -m sft list [DIR]                     (default: runs)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from apprentice.errors import RecipeError
    from factory.builtin import BuiltinModelError

    from .config import load_sft_config
    from .data import DataError

    console = Console(stderr=True, soft_wrap=True)
    try:
        config = load_sft_config(args.recipe, args.set)
        if args.command == "sweep":
            temperatures = _temperatures(args.temperatures)
            if not 0 < args.fraction <= 1:
                raise RecipeError(f"--fraction {args.fraction}: expected a share of the training data in (0, 1]")
            console.print(f"[bold]sft sweep[/] {args.recipe}: T in {temperatures}, fraction {args.fraction:g}")
            from .train import sweep

            sweep(config, temperatures, fraction=args.fraction, console=console)
            return 0
        console.print(f"[bold]sft train[/] {args.recipe} → {config.output_dir}")
        console.print_json(data=config.model_dump(mode="json"))
        from .train import train

        train(config, resume=args.resume, console=console)
    except (RecipeError, DataError, BuiltinModelError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    return 0


def _temperatures(text: str) -> list[float]:
    from apprentice.errors import RecipeError

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RecipeError(f"--temperatures {text!r}: expected numbers separated by commas, e.g. 1,2,4,8") from None
    if not values or any(value <= 0 for value in values):
        raise RecipeError(f"--temperatures {text!r}: expected positive numbers, e.g. 1,2,4,8")
    return values


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .train import find_students

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft", description="Apprentice student fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("train", help="fine-tune a student (LoRA/QLoRA, optionally distilled) on factory runs")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an sft: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set sft.max_steps=10 (repeatable)")
    cmd.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    cmd = sub.add_parser("sweep", help="short distillation runs at several temperatures, held-out loss table")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an sft: section that has distill:")
    cmd.add_argument("--temperatures", default="1,2,4,8,16", help="comma-separated, e.g. 1,2,4,8,16")
    cmd.add_argument("--fraction", type=float, default=0.1, help="share of the training split per run (default 0.1)")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    cmd = sub.add_parser("list", help="trained students: base model, data runs, date, final held-out loss")
    cmd.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="where to look (default: runs)")
    args = parser.parse_args(argv)
    if args.command in ("train", "sweep"):
        return _run(args)
    if args.command == "list":
        return _list(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
