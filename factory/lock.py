"""One writer per directory: an exclusive lock that two commands cannot both hold.

`generate` holds its run directory's lock for the whole run, `sft train` and `sft sweep` their output
directories, `eval run` its output directory. A second writer exits at once with "RUN_DIR is in use by
pid N" instead of interleaving records with the first. The lock is `fcntl.flock` on `run.lock` in the
directory: the kernel releases it when the process dies, however it dies, so `kill -9` leaves no stale
lock to clear by hand. Readers (`factory stats`, `factory review`, `sft train` reading a run) never take it.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from apprentice.errors import ApprenticeError

LOCK = "run.lock"


class DirectoryInUse(ApprenticeError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    def __init__(self, directory: Path, key: str = "output_dir") -> None:
        self.directory = Path(directory)
        self.key = key  # the recipe key that names the directory, for the error messages
        self._fd: int | None = None

    def acquire(self) -> None:
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise ApprenticeError(f"{self.key}: {directory} is a file, not a directory; choose another "
                                  f"{self.key} (--set {self.key}=...) or move the file away")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ApprenticeError(f"{self.key}: cannot create {directory} ({exc.strerror}); choose another "
                                  f"{self.key} (--set {self.key}=...)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryInUse(f"{directory} is in use by pid {holder}; wait for it or stop it") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()
