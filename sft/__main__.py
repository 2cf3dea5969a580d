"""`python -m sft train RECIPE.yaml [--set sft.key=value ...] [--resume]` — thin; heavy imports inside."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from factory.builtin import BuiltinModelError
    from factory.recipe import RecipeError

    from .config import load_sft_config
    from .data import DataError

    console = Console(stderr=True, soft_wrap=True)
    try:
        config = load_sft_config(args.recipe, args.set)
        console.print(f"[bold]sft train[/] {args.recipe} → {config.output_dir}")
        console.print_json(data=config.model_dump(mode="json"))
        from .train import train

        train(config, resume=args.resume, console=console)
    except (RecipeError, DataError, BuiltinModelError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft", description="Apprentice student fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("train", help="fine-tune a student (LoRA/QLoRA) on factory runs")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an sft: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set sft.max_steps=10 (repeatable)")
    cmd.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
