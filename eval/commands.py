"""The eval command, behind the thin `python -m eval` parser (eval/__main__.py). Exit codes: 0 scored (and
the gate, if any, passed); 1 the gate failed; 2 bad recipe or golden set (or the error's own code)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from apprentice.errors import ApprenticeError, os_error_message

from .config import load_eval_config
from .report import print_table
from .run import evaluate


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)
    try:
        config = load_eval_config(args.recipe, args.set)
        console.print(f"[bold]eval run[/] {args.recipe} → {config.output_dir}")
        summary, gate = evaluate(config, console)
    except ApprenticeError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except OSError as exc:  # a full disk, a permission: one line naming the path
        console.print(f"[red]error:[/] {escape(os_error_message(exc))}", highlight=False)
        return 1
    # A pipe or a log file gets the whole table rather than rich's 80-column default.
    print_table(summary, Console() if sys.stdout.isatty() else Console(width=160))
    console.print(f"report: {config.output_dir / 'report.html'}, {config.output_dir / 'report.md'}, "
                  f"{config.output_dir / 'results.json'}", highlight=False)
    return 1 if gate is not None and not gate.passed else 0


COMMANDS = {"run": run}
