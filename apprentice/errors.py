"""One base error for the whole project, with the fields each error carries declared, not patched on.

Every error Apprentice raises on purpose derives from `ApprenticeError`, so each command catches that one
class and prints its message (which names the file, key or value at fault and the fix) with an exit code,
instead of a traceback.
"""
from __future__ import annotations

import errno
from typing import Mapping

# Errors that no retry will mend and that every later request would hit too: stop the run.
FATAL_STATUS = {401: "the API key was rejected", 403: "access denied", 404: "model or endpoint not found"}


class ApprenticeError(Exception):
    """An error whose message is meant for the user. `exit_code` is what a command exits with."""

    exit_code: int = 2


def os_error_message(error: OSError) -> str:
    """An OSError as one line that names the path: "no space left on runs/demo/accepted.jsonl"."""
    where = error.filename or "the disk"
    if error.errno == errno.ENOSPC:
        return (f"no space left on {where}: free some space, then run the same command again; every line on "
                "disk is whole and nothing done so far is lost")
    return f"{error.strerror or error}: {where}"


class RecipeError(ApprenticeError):
    """A recipe that cannot be used; the message names the file, the keys and the fix."""


class TeacherError(ApprenticeError):
    """A request that did not produce an answer.

    `retryable` says whether the same request may succeed later (429, 5xx, timeouts, dropped
    connections). `retry_after` is the server's word in seconds, when it gave one. `rate_limited`
    marks a 429 so the limiter can back off all requests, not just this one. `attempts` is how many
    times the request was sent before this error was final.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        rate_limited: bool = False,
        headers: Mapping[str, str] | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.rate_limited = rate_limited
        self.headers = headers or {}
        self.attempts = attempts

    @property
    def fatal(self) -> bool:
        return self.status in FATAL_STATUS

    def prefixed(self, name: str) -> "TeacherError":
        """The same error, its message starting with `name` ("judge: HTTP 500: ...")."""
        return TeacherError(f"{name}: {self}", retryable=self.retryable, status=self.status,
                            retry_after=self.retry_after, rate_limited=self.rate_limited, headers=self.headers,
                            attempts=self.attempts)
