"""Stable hashes and canonical JSON: ids and cache keys are hashes of what was asked, so a resumed run,
or the same prompt in another run, finds what was made before."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(*parts: str, length: int = 24) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:length]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
