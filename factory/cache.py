"""Content-addressed response cache: SQLite in WAL mode, key = canonical request JSON + sample index.

A response is committed here before any record made from it is written, so after a crash the same
command answers every request it had already paid for from this file and sends nothing twice.
WAL with synchronous=NORMAL survives a killed process (not a power cut) at ~tens of µs a commit.
"""
from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def cache_key(body_json: str, sample_index: int) -> str:
    return hashlib.sha256(f"{body_json}\x00{sample_index}".encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, response TEXT NOT NULL, cost_usd REAL NOT NULL, created REAL NOT NULL)"
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[dict[str, Any], float] | None:
        row = self._db.execute("SELECT response, cost_usd FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0]), row[1]

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def put(self, key: str, response: dict[str, Any], cost_usd: float) -> None:
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, response, cost_usd, created) VALUES (?, ?, ?, ?)",
                (key, json.dumps(response, ensure_ascii=False), cost_usd, time.time()),
            )
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):  # SQLITE_FULL: the same stop as a full disk under the JSONL files
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path)) from None
            raise

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()
