"""`python -m factory generate|review|stats` — thin; heavy imports happen inside the command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from .pipeline import Run, print_result
    from .prompts import PromptError
    from .recipe import RecipeError, load_factory_config
    from .store import StoreError
    from .teachers.hosted import MissingKeyError

    console = Console(stderr=True, soft_wrap=True)
    try:
        config = load_factory_config(args.recipe, args.set)
        if args.limit is not None and args.limit < 1:
            raise RecipeError("--limit must be at least 1")
        console.print(f"[bold]factory generate[/] {args.recipe} → {config.output_dir}")
        console.print_json(data=config.model_dump(mode="json"))
        result = asyncio.run(Run(config, limit=args.limit, console=console).execute())
    except (RecipeError, PromptError, MissingKeyError, StoreError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    print_result(result, console, config.output_dir)
    return 0 if result.ok else (130 if result.status == "interrupted" else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factory", description="Apprentice data factory")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="build or resume a dataset run from a recipe")
    gen.add_argument("recipe", type=Path, help="recipe YAML with a factory: section")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set factory.samples_per_prompt=4 (repeatable)")
    gen.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N prompts")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
