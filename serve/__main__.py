"""`python -m serve RECIPE.yaml [--set serve.key=value ...]` — thin: the parser here, the command in
serve/commands.py. The same command is `apprentice serve RECIPE.yaml` (apprentice_cli builds it with `add_commands`).

It serves until SIGINT or SIGTERM. Exit codes: 0 stopped cleanly; 2 bad recipe (or the error's own code).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apprentice.commandline import PYTHON_M, add_output_options


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("recipe", type=Path, help="recipe YAML with a serve: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set serve.port=8001 (repeatable)")
    cmd.add_argument("--fit-router", action="store_true",
                     help="instead of serving: fit routing.mode learned's router on the shadow comparisons of "
                          "serve.log_dir, write it to serve.routing.router, and compare it with confidence-only "
                          "routing on held-out comparisons (needs scikit-learn)")
    add_output_options(cmd)


def add_commands(sub: argparse._SubParsersAction, launcher: str, name: str = "serve") -> None:
    """The serve command on `sub` (`apprentice serve`)."""
    cmd = sub.add_parser(name, help="serve the student behind an OpenAI-compatible router, the teacher as fallback")
    add_arguments(cmd)
    cmd.set_defaults(run=run, launcher=launcher, command="serve")


def run(args: argparse.Namespace) -> int:
    from .commands import COMMANDS  # the one late import: --help stays instant

    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=(
        "Apprentice serve: the OpenAI chat-completions API in front of the student, the teacher as fallback"))
    add_arguments(parser)
    parser.set_defaults(launcher=PYTHON_M, command="serve")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
