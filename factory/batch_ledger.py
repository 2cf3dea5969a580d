"""The batch driver's ledger (factory/batch.py): `RUN_DIR/batches.jsonl` folded into one Batch per batch.

Append-only, one whole line an event, fsync-free but unbuffered: prepared (the input file is written),
uploaded (OpenAI's file id), submitted (the provider's id; `adopted` when it was found rather than
answered), candidates and not_ours (Anthropic batches that may be this one, and those whose results proved
otherwise), fetched (with the keys that failed), abandoned (the provider refused it). A torn last line
is cut on open (store.repair_tail). The `ledger` event holds the run's token, the tag of its batches.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import repair_tail
from .teachers.batching import BatchState

LEDGER = "batches.jsonl"
BATCH_DIR = "batches"


@dataclass
class Batch:
    name: str
    round: int
    count: int
    worst_usd: float
    prepared_at: float
    file_id: str | None = None
    provider_id: str | None = None
    fetched: bool = False
    abandoned: bool = False
    candidates: list[str] = field(default_factory=list)  # ids that may be this batch (Anthropic), unconfirmed
    dismissed: list[str] = field(default_factory=list)   # candidates whose results were not ours
    answered: int = 0          # the provider's count of finished requests, for the progress line
    status: str = "prepared"
    state: BatchState | None = None  # the provider's last word on it

    @property
    def open(self) -> bool:
        return not (self.fetched or self.abandoned)


class Ledger:
    """`batches.jsonl`: what was prepared, uploaded, submitted and fetched, folded into Batch objects."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER
        self.dir = run_dir / BATCH_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self.batches: dict[str, Batch] = {}
        self.token: str | None = None
        self.failures: dict[str, int] = {}  # custom_id → failed attempts since the last `run` event
        if self.path.exists():
            with self.path.open("r", encoding="utf-8") as handle:
                for line in handle:
                    self._fold(json.loads(line))
        self._file = open(self.path, "ab", buffering=0)
        if self.token is None:
            self.append({"event": "ledger", "token": secrets.token_hex(8)})
        self.append({"event": "run", "at": time.time()})

    def _fold(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "ledger":
            self.token = event["token"]
        elif kind == "run":
            self.failures = {}
        elif kind == "prepared":
            self.batches[event["batch"]] = Batch(event["batch"], event["round"], event["count"],
                                                 event["worst_usd"], event["at"])
        else:
            batch = self.batches[event["batch"]]
            if kind == "uploaded":
                batch.file_id = event["file_id"]
            elif kind == "submitted":
                batch.provider_id = event["provider_id"]
                batch.status = "submitted"
                batch.candidates = []
            elif kind == "candidates":
                batch.candidates = list(event["ids"])
                batch.status = "unconfirmed"
            elif kind == "not_ours":
                batch.candidates.remove(event["id"])
                batch.dismissed.append(event["id"])
            elif kind == "fetched":
                batch.fetched = True
                batch.status = event.get("status", "fetched")
                for key in event.get("failed", ()):
                    self.failures[key] = self.failures.get(key, 0) + 1
            elif kind == "abandoned":
                batch.abandoned = True
                batch.status = "abandoned"

    def append(self, event: dict[str, Any]) -> None:
        self._fold(event)
        self._file.write((json.dumps(event, separators=(",", ":")) + "\n").encode("utf-8"))

    def known_ids(self) -> set[str]:
        """Every provider id the ledger has tied to a batch, as its id, a candidate or a dismissed one."""
        return {i for b in self.batches.values() for i in ([b.provider_id] if b.provider_id else []) + b.candidates
                + b.dismissed}

    def input_path(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def keys(self, name: str) -> list[str]:
        keys = []
        with self.input_path(name).open("r", encoding="utf-8") as handle:
            for line in handle:
                keys.append(json.loads(line)["custom_id"])
        return keys

    def next_name(self) -> str:
        return f"b{len(self.batches) + 1:05d}"

    def close(self) -> None:
        self._file.close()
