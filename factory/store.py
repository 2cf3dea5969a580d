"""The run directory: append-only JSONL writers, crash repair, the resume index, the manifest.

Every record is one `write()` of a whole line to an unbuffered file, so after a crash a file holds
whole lines plus at most one partial last line, which `repair_tail` cuts off on the next start.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from apprentice.errors import ApprenticeError

ACCEPTED = "accepted.jsonl"
REJECTED = "rejected.jsonl"
FAILED = "failed.jsonl"
FAILED_HISTORY = "failed_history.jsonl"
MANIFEST = "manifest.json"
CACHE = "cache.sqlite"


class StoreError(ApprenticeError):
    pass


def repair_tail(path: Path) -> int:
    """Cut a partial last line left by a crash; return the number of bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as handle:
        chunk = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - chunk)
            handle.seek(start)
            data = handle.read(end - start)
            if end == size and data.endswith(b"\n"):
                return 0
            cut = data.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                handle.truncate(keep)
                return size - keep
            end = start
        handle.truncate(0)
        return size


def id_key(record_id: str) -> int:
    """The resume index holds 64-bit ints, not strings: a million ids cost tens of MB, not hundreds."""
    return int(record_id[:16], 16)


def iter_ids(path: Path) -> Iterator[str]:
    """Ids of the records in a JSONL file, in order, without parsing whole lines where avoidable."""
    if not path.exists():
        return
    prefix = '{"id": "'
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.startswith(prefix):
                end = line.find('"', len(prefix))
                yield line[len(prefix) : end]
                continue
            try:
                yield json.loads(line)["id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise StoreError(
                    f"{path}:{number}: not a record written by the factory; move the file away or fix the line"
                ) from None


class Store:
    """Writers for accepted, rejected and failed records of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.repaired: dict[str, int] = {}
        for name in (ACCEPTED, REJECTED, FAILED):
            cut = repair_tail(run_dir / name)
            if cut:
                self.repaired[name] = cut
        # Accepted and rejected ids apart: best_of needs to know which samples of a half-written prompt were kept.
        self.accepted: set[int] = set()
        self.rejected: set[int] = set()
        self.resumed_accepted = self._index(ACCEPTED, self.accepted)
        self.resumed_rejected = self._index(REJECTED, self.rejected)
        self.previous_failures = self._rotate_failed()
        self._files = {
            name: open(run_dir / name, "ab", buffering=0) for name in (ACCEPTED, REJECTED, FAILED)
        }

    def _index(self, name: str, ids: set[int]) -> int:
        count = 0
        for record_id in iter_ids(self.run_dir / name):
            ids.add(id_key(record_id))
            count += 1
        return count

    def _rotate_failed(self) -> int:
        """Failures of an earlier run are retried; their records move to failed_history.jsonl."""
        failed = self.run_dir / FAILED
        if not failed.exists() or failed.stat().st_size == 0:
            return 0
        data = failed.read_bytes()
        with open(self.run_dir / FAILED_HISTORY, "ab") as history:
            history.write(data)
            history.flush()
            os.fsync(history.fileno())
        failed.write_bytes(b"")
        return data.count(b"\n")

    def is_done(self, record_id: str) -> bool:
        key = id_key(record_id)
        return key in self.accepted or key in self.rejected

    def is_accepted(self, record_id: str) -> bool:
        """Accepted when this run started (records written by this run are not looked up again)."""
        return id_key(record_id) in self.accepted

    def write(self, name: str, line: str) -> None:
        """Append one whole line, or nothing: a write cut short (a full disk) is undone before the error
        goes up, so every line on disk stays whole and the same command resumes once there is space."""
        handle = self._files[name]
        data = (line + "\n").encode("utf-8")
        start = handle.tell()
        try:
            written = handle.write(data)
            while written < len(data):  # a raw write may take part of the bytes
                written += handle.write(memoryview(data)[written:])
        except OSError as exc:
            handle.truncate(start)
            if exc.filename is None:
                exc.filename = str(self.run_dir / name)
            raise

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # written atomically, so this is a hand-edited file; it is rewritten below


def replace_whole(path: Path, text: str) -> None:
    """`path` replaced by `text` at once (a temporary file of this process, then `os.replace`): a reader, or a
    crash, never sees half of it, and processes that write the same file do not share a temporary one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    replace_whole(run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
