"""`python -m sft train|sweep|list` — thin: the parser here, the commands in sft/commands.py.

    python -m sft train RECIPE.yaml [--set sft.key=value ...] [--resume]
    python -m sft sweep RECIPE.yaml --temperatures 1,2,4,8,16 --fraction 0.1 [--set ...]
    python -m sft list [DIR]                     (default: runs)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft", description="Apprentice student fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("train", help="fine-tune a student (LoRA/QLoRA, optionally distilled) on factory runs")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an sft: section")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set sft.max_steps=10 (repeatable)")
    cmd.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    cmd = sub.add_parser("sweep", help="short distillation runs at several temperatures, held-out loss table")
    cmd.add_argument("recipe", type=Path, help="recipe YAML with an sft: section that has distill:")
    cmd.add_argument("--temperatures", default="1,2,4,8,16", help="comma-separated, e.g. 1,2,4,8,16")
    cmd.add_argument("--fraction", type=float, default=0.1, help="share of the training split per run (default 0.1)")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    cmd = sub.add_parser("list", help="trained students: base model, data runs, date, final held-out loss")
    cmd.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="where to look (default: runs)")
    args = parser.parse_args(argv)
    from .commands import COMMANDS  # the one late import: --help stays instant

    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
