"""The factory's commands, behind the thin `python -m factory` parser (factory/__main__.py).

Each command ends in one message and an exit code, never a traceback: every error Apprentice raises on
purpose is an ApprenticeError whose message names the file, key or value at fault and the fix.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from apprentice.commandline import command_line
from apprentice.config import load_recipe_data
from apprentice.console import CommandConsole
from apprentice.errors import ApprenticeError, RecipeError
from apprentice.tracking import choose, log_figures

from . import review, review_ledger
from .export import export_run
from .plan import plan_run, print_plan
from .ray_runner import run_on_ray
from .recipe import load_factory_config
from .run import Run
from .run_report import print_result
from .stats import compute_stats, render_stats, stats_figures
from .store import read_manifest


def generate(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity)
    try:
        with console.warnings_shown():
            return _generate(args, console)
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return console.stopped(exc)
    except KeyboardInterrupt:  # before the run's own handler is installed (e.g. during the self-instruct expansion)
        console.final("[yellow]interrupted: run the same command again to resume; answers paid for are in the "
                      "run's cache and are not paid twice[/]")
        return 130
    finally:
        console.close_log()


def _track(config: Any, recipe: Path, console: CommandConsole) -> None:
    """The run's final figures (manifest.json's stats) to the tracker of factory.report_to or sft.report_to."""
    trackers, left_out = choose(config.report_to, (load_recipe_data(recipe).get("sft") or {}).get("report_to"))
    stats = (read_manifest(config.output_dir) or {}).get("stats") or {}
    if trackers and "counts" in stats:
        for path in log_figures(trackers, config.output_dir / "tensorboard", stats_figures(stats)):
            console.print(escape(f"tracker: the run's figures → {path} (tensorboard)"), highlight=False)
    if left_out:
        console.print(escape(f"tracker: the factory logs to tensorboard only; sft.report_to's {', '.join(left_out)} "
                             "gets the trainer's figures alone"), highlight=False)


def _generate(args: argparse.Namespace, console: CommandConsole) -> int:
    config = load_factory_config(args.recipe, args.set)
    if args.limit is not None and args.limit < 1:
        raise RecipeError("--limit must be at least 1")
    this = command_line(args.launcher, "factory", "generate", args.recipe)
    dry = " (dry run: nothing is sent or written)" if args.dry_run else ""
    console.print(f"[bold]{escape(this)}[/] → {escape(str(config.output_dir))}{dry}", highlight=False)
    console.detail_json(config.model_dump(mode="json"))  # -v; it is in manifest.json too
    if args.dry_run:
        plan = asyncio.run(plan_run(config, limit=args.limit, console=console))
        print_plan(plan, config, console)
        again = " ".join([this] + [f"--set {shlex.quote(item)}" for item in args.set]
                         + ([f"--limit {args.limit}"] if args.limit is not None else []))
        console.final(f"next: {escape(again)} (without --dry-run) to run it", highlight=False)
        return 0
    if config.runner == "ray":
        result = run_on_ray(config, limit=args.limit, console=console)
    else:
        result = asyncio.run(Run(config, limit=args.limit, console=console).execute())
    print_result(result, console, config.output_dir)
    _track(config, args.recipe, console)
    if result.ok:
        run_dir = config.output_dir
        review_it = command_line(args.launcher, "factory", "review", run_dir)
        train = command_line(args.launcher, "sft", "train", args.recipe)
        if "sft" not in load_recipe_data(args.recipe):
            train = f"add an sft: section (data: [{run_dir}]) to {args.recipe}, then {train}"
        console.final(f"next: {escape(review_it)} (the rejected samples), then {escape(train)}", highlight=False)
    return 0 if result.ok else (130 if result.status == "interrupted" else 1)


def stats(args: argparse.Namespace) -> int:
    try:
        figures = compute_stats(args.run_dir)
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return CommandConsole(transcript=False).stopped(exc)
    if args.json:
        print(json.dumps(figures, indent=2, ensure_ascii=False))
    else:
        render_stats(figures, args.run_dir, Console())
    return 0


def review_command(args: argparse.Namespace) -> int:
    console = Console()
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
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return CommandConsole(transcript=False).stopped(exc)
    return 0


def export_command(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        result = export_run(args.run_dir, args.format, args.out, rejected=args.rejected,
                            push_to_hub=args.push_to_hub, private=not args.public)
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return console.stopped(exc)
    except KeyboardInterrupt:  # a half export is removed; one interrupted while it was pushed is kept
        kept = args.out.is_dir() and any(args.out.iterdir())
        state = "the export is kept, not pushed" if kept else "nothing was kept"
        console.final(f"[yellow]interrupted: {state} in {escape(str(args.out))}[/]", highlight=False)
        return 130
    which = "rejected" if args.rejected else "accepted"
    console.print(f"exported {result.samples} {which} sample(s) as {result.format} to "
                  f"{escape(str(result.data))}", highlight=False)
    if result.without_logprobs:
        console.print(f"[yellow]left out[/] {result.without_logprobs} sample(s) without the teacher's logprobs",
                      highlight=False)
    if result.cut_off:
        console.print(f"[yellow]left out[/] {result.cut_off} sample(s) the teacher did not finish (finish_reason "
                      "length): Axolotl would line their logprobs up one token off", highlight=False)
    if result.pushed:
        console.print(f"pushed to {escape(result.pushed)}", highlight=False)
    console.final(f"dataset card: {escape(str(result.card))}", highlight=False)
    return 0


COMMANDS = {"generate": generate, "stats": stats, "review": review_command, "export": export_command}
