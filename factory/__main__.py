"""`python -m factory generate|review|stats` — thin; heavy imports happen inside the command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from apprentice.errors import RecipeError

    from .prompts import PromptError
    from .recipe import load_factory_config
    from .run import Run, print_result
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
    except KeyboardInterrupt:  # before the run's own handler is installed (e.g. during the self-instruct expansion)
        console.print("[yellow]interrupted: run the same command again to resume; answers paid for are in the "
                      "run's cache and are not paid twice[/]")
        return 130
    print_result(result, console, config.output_dir)
    return 0 if result.ok else (130 if result.status == "interrupted" else 1)


def _stats(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from .stats import StatsError, compute_stats, render_stats

    try:
        stats = compute_stats(args.run_dir)
    except StatsError as exc:
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        render_stats(stats, args.run_dir, Console())
    return 0


def _review(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from . import review, review_ledger
    from .store import StoreError

    console = Console()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        if args.promote or args.demote:
            decide = review_ledger.promote if args.promote else review_ledger.demote
            written = decide(args.run_dir, args.promote or args.demote, args.why or "")
            action = "promoted" if args.promote else "demoted"
            ledger = escape(str(args.run_dir / review_ledger.REVIEW))
            console.print(f"{action} {len(written)} sample(s) in {ledger}", highlight=False)
        elif args.reason:
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
            review.show_reason(args.run_dir, args.reason, console, limit=args.limit,
                               page_size=max(1, args.page_size), interactive=interactive)
        else:
            review.show_counts(args.run_dir, console)
    except (review_ledger.ReviewError, StoreError) as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factory", description="Apprentice data factory")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="build or resume a dataset run from a recipe")
    gen.add_argument("recipe", type=Path, help="recipe YAML with a factory: section")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set factory.samples_per_prompt=4 (repeatable)")
    gen.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N prompts")
    stats = sub.add_parser("stats", help="counts by reason, tokens, cost, throughput, coverage, diversity of a run")
    stats.add_argument("run_dir", type=Path)
    stats.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    review = sub.add_parser("review", help="rejected samples by reason; promote or demote samples")
    review.add_argument("run_dir", type=Path)
    review.add_argument("--reason", metavar="CHECK", help="show the samples rejected by this check")
    review.add_argument("--limit", type=int, default=None, metavar="N", help="with --reason: show at most N")
    review.add_argument("--page-size", type=int, default=5, metavar="N", help="with --reason on a terminal")
    decide = review.add_mutually_exclusive_group()
    decide.add_argument("--promote", nargs="+", metavar="ID", help="count these samples as accepted")
    decide.add_argument("--demote", nargs="+", metavar="ID", help="count these samples as rejected")
    review.add_argument("--why", metavar="TEXT", help="the reason for --promote / --demote (required with them)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "stats":
        return _stats(args)
    if args.command == "review":
        return _review(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
