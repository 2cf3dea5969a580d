"""What every command line shares, with argparse only (so that `--help` stays instant): the `-q`/`-v`
options, and how a command names the next one to run.

The commands answer to two spellings: `python -m factory generate` and `apprentice generate` (the console
script, apprentice_cli). A command's closing line names the next command in the spelling the user typed.
"""
from __future__ import annotations

import argparse
import shlex

QUIET, NORMAL, VERBOSE = -1, 0, 1

# (stage, command) → its name under the `apprentice` script, in the order `apprentice --help` lists them.
APPRENTICE_NAMES = {
    ("factory", "generate"): "generate",
    ("factory", "review"): "review",
    ("factory", "stats"): "stats",
    ("factory", "export"): "export",
    ("sft", "train"): "train",
    ("sft", "sweep"): "sweep",
    ("sft", "list"): "list",
    ("sft", "card"): "card",
    ("eval", "run"): "eval",
    ("serve", "serve"): "serve",
}
APPRENTICE = "apprentice"
PYTHON_M = "python -m"  # the launcher of `python -m factory|sft|eval|serve`


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """-q (errors and the last line only) and -v (details too, such as the resolved recipe)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=QUIET, default=NORMAL,
                       help="print errors and the last line only")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=VERBOSE,
                       help="print details too (the resolved recipe)")


def command_line(launcher: str, stage: str, command: str, *operands: object) -> str:
    """`stage command operands…` as the user runs it: `apprentice train r.yaml` under the apprentice script
    (`launcher` "apprentice"), `python -m sft train r.yaml` otherwise. Operands with spaces are quoted."""
    words = [APPRENTICE, APPRENTICE_NAMES[(stage, command)]] if launcher == APPRENTICE \
        else ["python", "-m", stage, command]
    words += [shlex.quote(str(operand)) for operand in operands]
    return " ".join(words)
