"""The eval command, behind the thin `python -m eval` parser (eval/__main__.py). Exit codes: 0 scored (and
the gate, if any, passed); 1 the gate failed; 2 bad recipe or golden set (or the error's own code)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from apprentice.commandline import command_line
from apprentice.config import load_recipe_data
from apprentice.console import CommandConsole
from apprentice.errors import ApprenticeError
from apprentice.tracking import choose, log_figures

from .config import load_eval_config
from .report import print_table
from .run import eval_figures, evaluate


def run(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        config = load_eval_config(args.recipe, args.set)
        this = command_line(args.launcher, "eval", "run", args.recipe)
        console.print(f"[bold]{escape(this)}[/] → {escape(str(config.output_dir))}", highlight=False)
        console.detail_json(config.model_dump(mode="json"))
        summary, gate = evaluate(config, console)
        trackers, left_out = choose(config.report_to, (load_recipe_data(args.recipe).get("sft") or {}).get("report_to"))
        for path in log_figures(trackers, config.output_dir / "tensorboard", *eval_figures(summary)):
            console.print(escape(f"tracker: scores, retention and gate → {path} (tensorboard)"), highlight=False)
        if left_out:
            console.print(escape(f"tracker: eval logs to tensorboard only; sft.report_to's {', '.join(left_out)} "
                                 "gets the trainer's figures alone"), highlight=False)
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return console.stopped(exc)
    if args.verbosity >= 0:  # the table is the result: on stdout, apart from the progress on stderr
        # A pipe or a log file gets the whole table rather than rich's 80-column default.
        print_table(summary, Console() if sys.stdout.isatty() else Console(width=160))
    report = config.output_dir / "report.html"
    student = summary["models"].get(summary["student"]) or {}
    if student.get("lineage") and student.get("provider") == "local":  # a student trained here: its card can say so
        folder = Path(student["model"])
        folder = folder if (folder / "lineage.json").is_file() else folder.parent
        console.print(escape(f"model card: {command_line(args.launcher, 'sft', 'card', folder)} --eval "
                             f"{config.output_dir} adds this table"), highlight=False)
    console.print(escape(f"also: {config.output_dir / 'report.md'}, {config.output_dir / 'results.json'}"),
                  highlight=False)
    if gate is None:
        verdict = "no gate set (eval.gate)"
    elif gate.passed:
        verdict = "gate passed: the student may ship"
    else:
        verdict = f"gate FAILED (exit 1): {gate.reason}"
    console.final(escape(f"report: {report} · {verdict}"), highlight=False)
    return 1 if gate is not None and not gate.passed else 0


COMMANDS = {"run": run}
