"""The `apprentice` console script: every command of the three stages under one name.

    apprentice generate|review|stats|export … = python -m factory generate|review|stats|export …
    apprentice train|sweep|list|lineage|card … = python -m sft train|sweep|list|lineage|card …
    apprentice eval RECIPE.yaml …         = python -m eval run RECIPE.yaml …
    apprentice serve RECIPE.yaml …        = python -m serve RECIPE.yaml …

The top of the cli layer, so outside the shared `apprentice/` package (the leaf, which imports none of the
stages): it imports each stage's thin parser module, which holds argparse only, and the stage's own `run`
imports its commands once one is chosen; `apprentice --help` loads none of the engines.
"""
from __future__ import annotations

import argparse
import sys

from apprentice import __version__
from apprentice.commandline import APPRENTICE
from eval import __main__ as eval_cli
from factory import __main__ as factory_cli
from serve import __main__ as serve_cli
from sft import __main__ as sft_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=APPRENTICE,
        description="Apprentice: teacher LLM → dataset → fine-tuned student → eval gate. "
                    "`apprentice COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{APPRENTICE} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    factory_cli.add_commands(sub, APPRENTICE)
    sft_cli.add_commands(sub, APPRENTICE)
    eval_cli.add_commands(sub, APPRENTICE, name="eval")
    serve_cli.add_commands(sub, APPRENTICE)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
