"""The factory's and eval's figures to the tracker the trainer logs to (`sft.report_to`), so that one
dashboard shows a run's data, its training and its eval side by side.

`factory.report_to` and `eval.report_to` name the tracker; left unset, they take `sft.report_to` from the
same recipe. The trainer reaches every tracker transformers supports; the factory and eval log to
tensorboard (event files under RUN_DIR/tensorboard and EVAL_DIR/tensorboard, so `tensorboard --logdir runs`
shows them beside the trainer's under OUTPUT_DIR/checkpoints/runs). Another tracker inherited from
`sft.report_to` is left out there, and the command says so.

Shared leaf: no project imports; the tensorboard writer (torch's) is imported when one is asked for.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ApprenticeError

SUPPORTED = ("tensorboard",)
NONE = ("none", "")


class TrackerError(ApprenticeError):
    """A tracker that cannot be used; the message names the key and the fix."""


def tracker_names(report_to: str | list[str] | None) -> list[str]:
    """`report_to` as a list of trackers, "none" dropped (transformers' spelling: a name or a list)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name not in NONE]


def unsupported(report_to: str | list[str] | None) -> list[str]:
    return [name for name in tracker_names(report_to) if name not in SUPPORTED]


def choose(own: str | list[str] | None, inherited: Any) -> tuple[list[str], list[str]]:
    """(trackers to log to, trackers of sft.report_to left out): a section's own `report_to` when set,
    else `sft.report_to` of the same recipe."""
    if own is not None:
        return tracker_names(own), []
    names = tracker_names(inherited if isinstance(inherited, (str, list)) else None)
    return [n for n in names if n in SUPPORTED], [n for n in names if n not in SUPPORTED]


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", name).strip("_") or "_"


def log_figures(trackers: list[str], log_dir: Path, scalars: dict[str, float], texts: dict[str, str] | None = None,
                step: int = 0) -> list[Path]:
    """Write the figures (tag → number; tags are sanitised) and texts to each tracker; the folders written."""
    written = []
    if "tensorboard" in trackers:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackerError("report_to: tensorboard needs the tensorboard package: pip install tensorboard, "
                               "or set report_to: none") from None
        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for tag, value in scalars.items():
                if isinstance(value, (int, float)) and value == value:  # NaN (an undefined ratio) is left out
                    writer.add_scalar(_tag(tag), float(value), step)
            for tag, value in (texts or {}).items():
                writer.add_text(_tag(tag), value, step)
        finally:
            writer.close()
        written.append(Path(log_dir))
    return written
