"""`python -m eval run RECIPE.yaml [--set eval.key=value ...]` — thin: the parser here, the command in eval/commands.py.

Exit codes: 0 scored (and the gate, if any, passed); 1 the gate failed; 2 bad recipe or golden set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Apprentice evaluation and release gate")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="score models on golden sets, write the report, apply the gate")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an eval: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set eval.perf_prompts=0 (repeatable)")
    args = parser.parse_args(argv)
    from .commands import COMMANDS  # the one late import: --help stays instant

    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
