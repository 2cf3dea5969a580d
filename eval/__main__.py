"""`python -m eval run RECIPE.yaml [--set eval.key=value ...]` — thin: the parser here, the command in
eval/commands.py. The same command is `apprentice eval RECIPE.yaml` (apprentice_cli builds it with `add_commands`).

Exit codes: 0 scored (and the gate, if any, passed); 1 the gate failed; 2 bad recipe or golden set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apprentice.commandline import PYTHON_M, add_output_options


def add_commands(sub: argparse._SubParsersAction, launcher: str, name: str = "run") -> None:
    """The eval command on `sub`, called `name` there (`run` under python -m eval, `eval` under apprentice)."""
    cmd = sub.add_parser(name, help="score models on golden sets, write the report, apply the gate")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an eval: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set eval.perf_prompts=0 (repeatable)")
    add_output_options(cmd)
    cmd.set_defaults(run=run, launcher=launcher, command="run")


def run(args: argparse.Namespace) -> int:
    from .commands import COMMANDS  # the one late import: --help stays instant

    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Apprentice evaluation and release gate")
    add_commands(parser.add_subparsers(dest="command", required=True), PYTHON_M)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
