"""`python -m sft train|sweep|list|lineage|card` — thin: the parser here, the commands in sft/commands.py.
The same subcommands are `apprentice train|sweep|list` (apprentice_cli builds them with `add_commands`).

    python -m sft train RECIPE.yaml [--set sft.key=value ...] [--resume] [-q | -v]
    python -m sft sweep RECIPE.yaml [--fraction 0.1] [--set ...]              (sft.sweep: trials, space, objective)
    python -m sft sweep RECIPE.yaml --temperatures 1,2,4,8,16 --fraction 0.1  (distillation temperatures only)
    python -m sft list [DIR]                     (default: runs)
    python -m sft lineage STUDENT_DIR [--verify]
    python -m sft card STUDENT_DIR [--eval DIR ...] [--push-to-hub OWNER/NAME [--merged] [--public]]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apprentice.commandline import PYTHON_M, add_output_options


def add_commands(sub: argparse._SubParsersAction, launcher: str) -> None:
    """The sft subcommands on `sub`; `launcher` says how the user runs them (for the next-step lines)."""
    train = sub.add_parser("train", help="fine-tune a student (LoRA/QLoRA, optionally distilled) on factory runs")
    train.add_argument("recipe", type=Path, help="recipe YAML with an sft: section")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set sft.max_steps=10 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    _push_options(train)
    add_output_options(train)
    sweep = sub.add_parser("sweep", help="short training runs over sft.sweep's settings, each scored on the golden "
                                         "sets; sweep.md, best.yaml")
    sweep.add_argument("recipe", type=Path, help="recipe YAML with an sft: section that has sweep: (or distill:, "
                                                 "for --temperatures)")
    sweep.add_argument("--temperatures", default=None,
                       help="comma-separated, e.g. 1,2,4,8,16: one run per distillation temperature, ranked by "
                            "held-out loss (the default, 1,2,4,8,16, when the recipe has no sft.sweep)")
    sweep.add_argument("--fraction", type=float, default=None,
                       help="share of the training split per run (default: sft.sweep.fraction, else 0.1)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    add_output_options(sweep)
    listing = sub.add_parser("list", help="trained students: base model, data runs, date, held-out loss, the last "
                                          "eval's score, retention, latency and cost")
    listing.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="where to look (default: runs)")
    lineage = sub.add_parser("lineage", help="a student's lineage; --verify recomputes every hash (data, review, "
                                             "golden sets, weights) and names what changed")
    lineage.add_argument("student", type=Path, help="the student's folder (sft.output_dir, or its merged/)")
    lineage.add_argument("--verify", action="store_true", help="recompute every hash; exit 1 if anything changed")
    add_output_options(lineage)
    card = sub.add_parser("card", help="write a trained student's model card (README.md), with its eval table "
                                       "once eval ran; optionally push it to the Hub")
    card.add_argument("student_dir", type=Path, help="a trained student: the sft.output_dir holding lineage.json")
    card.add_argument("--eval", action="append", type=Path, default=None, metavar="DIR", dest="eval_dirs",
                      help="an eval.output_dir holding results.json (repeatable; default: the folders beside "
                           "STUDENT_DIR)")
    _push_options(card)
    add_output_options(card)
    for name, command in (("train", train), ("sweep", sweep), ("list", listing), ("lineage", lineage),
                          ("card", card)):
        command.set_defaults(run=run, launcher=launcher, command=name)


def _push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                        help="upload the adapter, its model card and lineage to this Hub model repo (private)")
    parser.add_argument("--merged", action="store_true", help="with --push-to-hub: upload the merged model instead")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: create the repo public")


def run(args: argparse.Namespace) -> int:
    from .commands import COMMANDS  # the one late import: --help stays instant

    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft", description="Apprentice student fine-tuning")
    add_commands(parser.add_subparsers(dest="command", required=True), PYTHON_M)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
