"""`python -m factory generate|review|stats|export` — thin: the parser here, the commands in factory/commands.py.
The same subcommands are `apprentice generate|review|stats|export` (apprentice_cli builds them with `add_commands`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apprentice.commandline import PYTHON_M, add_output_options


def add_commands(sub: argparse._SubParsersAction, launcher: str) -> None:
    """The factory's subcommands on `sub`; `launcher` says how the user runs them (for the next-step lines)."""
    gen = sub.add_parser("generate", help="build or resume a dataset run from a recipe")
    gen.add_argument("recipe", type=Path, help="recipe YAML with a factory: section")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set factory.samples_per_prompt=4 (repeatable)")
    gen.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N prompts")
    gen.add_argument("--dry-run", action="store_true",
                     help="check everything, count the requests, estimate tokens and cost; send and write nothing")
    add_output_options(gen)
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
    export = sub.add_parser("export", help="write a run's samples as messages, sharegpt, alpaca, parquet or hf "
                                           "(or with the teacher's logprobs: axolotl-kd, distillkit), with a card")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", required=True,
                        metavar="{messages,sharegpt,alpaca,parquet,hf,axolotl-kd,distillkit}",
                        help="messages/sharegpt/alpaca: JSONL; parquet: TRL prompt-completion columns; "
                             "hf: datasets save_to_disk; axolotl-kd (JSONL) and distillkit (parquet): with the "
                             "teacher's top-k token logprobs from the run's sidecar")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty folder")
    export.add_argument("--rejected", action="store_true",
                        help="export the rejected samples (after review) instead of the accepted ones")
    export.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                        help="then upload the folder to this Hub dataset repo (private; needs `hf auth login`)")
    export.add_argument("--public", action="store_true", help="with --push-to-hub: create the repo public")
    add_output_options(export)
    for name, command in (("generate", gen), ("stats", stats), ("review", review), ("export", export)):
        command.set_defaults(run=run, launcher=launcher, command=name)


def run(args: argparse.Namespace) -> int:
    from .commands import COMMANDS  # the one late import: --help stays instant and free of the engine

    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factory", description="Apprentice data factory")
    add_commands(parser.add_subparsers(dest="command", required=True), PYTHON_M)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
