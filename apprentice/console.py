"""The console a command prints through: the terminal (stderr) at the user's verbosity, and a transcript.

    -q   errors and the command's last line only (`final`)
         (default) what a person follows: a short summary, progress, warnings, the result
    -v   details too (`detail`: the resolved recipe)

The transcript keeps what the terminal shows at the default verbosity or more, whatever -q hides, and
Python warnings; `open_log` appends it to a file of the output directory (factory generate: run.log),
the lines printed before the directory existed first. Values of environment variables that hold secrets
(API keys, tokens, and the variables a recipe names) are masked in it.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from rich.console import Console
from rich.control import Control
from rich.markup import escape

from .commandline import NORMAL, VERBOSE
from .errors import ApprenticeError, os_error_message

TRANSCRIPT_WIDTH = 120
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
MASK = "***"


def secret_values(names: Iterable[str] = ()) -> list[str]:
    """The values of the environment variables that hold secrets: those named, and any whose name says
    so; the longest first, so that a key containing another is masked whole. Short values (a flag) are not
    secrets worth masking, and masking them would garble the text."""
    named = set(names)
    values = {value for name, value in os.environ.items()
              if (name in named or _SECRET_NAME.search(name)) and len(value) >= 8}
    return sorted(values, key=len, reverse=True)


class _Transcript:
    """A text file for rich: lines kept in memory until `open`, then appended to the file as they come."""

    encoding = "utf-8"

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.handle: IO[str] | None = None
        self.secret_names: set[str] = set()

    def write(self, text: str) -> int:
        for value in secret_values(self.secret_names):
            text = text.replace(value, MASK)
        if self.handle is None:
            self.pending.append(text)
        else:
            self.handle.write(text)
            self.handle.flush()
        return len(text)

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()

    def isatty(self) -> bool:
        return False

    def open(self, path: Path) -> None:
        self.close()
        self.handle = path.open("a", encoding="utf-8")
        self.handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S%z')} ---\n")
        pending, self.pending = self.pending, []
        for text in pending:
            self.write(text)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class CommandConsole(Console):
    """A rich Console on stderr (by default) that honours -q/-v and keeps a transcript for a log file.

    Every `print` goes to both, except the redraws of a live display (a progress bar is not a line of the
    log); with -q the terminal side is rich's `quiet`, so a progress bar is not drawn either."""

    def __init__(self, verbosity: int = NORMAL, *, transcript: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("stderr", True)
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("emoji", False)  # `:smile:` in a prompt or a path is text, not an emoji code
        super().__init__(quiet=verbosity < NORMAL, **kwargs)
        self.verbosity = verbosity
        self._log_file = _Transcript() if transcript else None
        self.transcript = None if self._log_file is None else Console(
            file=self._log_file, width=TRANSCRIPT_WIDTH, soft_wrap=True, force_terminal=False, no_color=True,
            highlight=False, emoji=False)

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self.transcript is not None and not any(isinstance(item, Control) for item in objects):
            self.transcript.print(*objects, **kwargs)
        super().print(*objects, **kwargs)

    def final(self, *objects: Any, **kwargs: Any) -> None:
        """A line shown even with -q: an error, or the command's last line."""
        quiet, self.quiet = self.quiet, False
        try:
            self.print(*objects, **kwargs)
        finally:
            self.quiet = quiet

    def stopped(self, error: Exception) -> int:
        """The one line a command ends on when it stops on `error`, and the exit code: an ApprenticeError's
        own message and code, an OSError (a full disk, a permission) as one line naming the path, code 1."""
        if isinstance(error, ApprenticeError):
            self.final(f"[red]error:[/] {escape(str(error))}", highlight=False)
            return error.exit_code
        assert isinstance(error, OSError), error
        self.final(f"[red]error:[/] {escape(os_error_message(error))}", highlight=False)
        return 1

    def detail(self, *objects: Any, **kwargs: Any) -> None:
        """A line shown (and logged) only with -v."""
        if self.verbosity >= VERBOSE:
            self.print(*objects, **kwargs)

    def detail_json(self, data: Any) -> None:
        if self.verbosity >= VERBOSE:
            self.print_json(data=data)

    def open_log(self, path: Path, secret_env: Iterable[str | None] = ()) -> None:
        """Append the transcript to `path` from now on, starting with what was printed before; the values of
        the variables in `secret_env` (the API key variables a recipe names) are masked, like any whose
        name says it holds a secret. Does nothing for a console that keeps no transcript."""
        if self._log_file is None:
            return
        self._log_file.secret_names.update(name for name in secret_env if name)
        self._log_file.open(path)

    def close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()

    @contextmanager
    def warnings_shown(self) -> Iterator[None]:
        """Python warnings raised meanwhile are printed as lines of this console (so they reach the log)."""

        def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: Any = None) -> None:
            self.print(f"[yellow]warning:[/] {escape(str(message))} ({category.__name__}, "
                       f"{escape(os.path.basename(filename))}:{lineno})", highlight=False)

        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
