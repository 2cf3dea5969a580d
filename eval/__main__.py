"""`python -m eval run RECIPE.yaml [--set eval.key=value ...]` — thin; heavy imports inside.

Exit codes: 0 scored (and the gate, if any, passed); 1 the gate failed; 2 bad recipe or golden set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from apprentice.errors import RecipeError
    from factory.builtin import BuiltinModelError
    from factory.prompts import PromptError
    from factory.teachers.hosted import MissingKeyError

    from .config import load_eval_config

    console = Console(stderr=True, soft_wrap=True)
    try:
        config = load_eval_config(args.recipe, args.set)
        console.print(f"[bold]eval run[/] {args.recipe} → {config.output_dir}")
        from .report import print_table
        from .run import evaluate

        summary, gate = evaluate(config, console)
    except (RecipeError, PromptError, MissingKeyError, BuiltinModelError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    # A pipe or a log file gets the whole table rather than rich's 80-column default.
    print_table(summary, Console() if sys.stdout.isatty() else Console(width=160))
    console.print(f"report: {config.output_dir / 'report.html'}, {config.output_dir / 'report.md'}, "
                  f"{config.output_dir / 'results.json'}", highlight=False)
    return 1 if gate is not None and not gate.passed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Apprentice evaluation and release gate")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="score models on golden sets, write the report, apply the gate")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an eval: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set eval.perf_prompts=0 (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
