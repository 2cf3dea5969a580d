"""What a run's limiters learnt about the provider's limits, kept in the run directory (`limits.json`) so that
the same command run again starts from it instead of learning it again with 429s.

One thing is kept: the buckets a 429 with room left in the headers showed to be enforced in windows shorter
than the minute the headers describe (factory/pacing.py, `Pacer.short`), with the limit the headers gave them.
A resumed run builds those buckets before its first request and paces them evenly from it: without the file,
it would ramp into the bucket again and overrun the provider's short window again (a 429 or two, and a pause
of every request until the window ends). The other figures a limiter holds (what remains, the pace's cut
after a stray 429) are about the moment, and the first answers bring them again.

The file is written whole (a temporary file, then `os.replace`), so a crash never leaves half of it. One that
cannot be read (edited by hand, a disk fault) is ignored with a warning naming it: it only saves a resumed run
a 429 or two, and refusing to resume a paid run over it would cost more than it protects. A good one
replaces it once the run learns a short window again.

Keys: each limiter by the endpoint it speaks for (provider, base URL, model), so a judge with a limiter of
its own keeps its own. A fleet's endpoints (`teacher.base_url` as a list) limit themselves inside the
teacher and are not kept here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from .limiter import Limiter
from .recipe import TeacherConfig
from .store import replace_whole

LIMITS = "limits.json"
PAUSES = "pauses.json"  # in the Ray runner's shards/: until when (epoch seconds) each endpoint's workers wait
VERSION = 1


def limiter_key(config: TeacherConfig) -> str:
    """The endpoint whose limits a limiter follows."""
    return f"{config.provider} {config.base_url or '-'} {config.model}"


def read_limits(run_dir: Path) -> tuple[dict[str, dict[str, float]], str | None]:
    """Each limiter's short-window buckets and their limits ({key: {bucket: limit}}), and a warning when the
    file is there but cannot be used (then nothing is taken from it)."""
    path = run_dir / LIMITS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, _unusable(path, f"{type(exc).__name__}: {exc}")
    try:
        if data.get("version") != VERSION:
            return {}, _unusable(path, f"version {data.get('version')!r}, this Apprentice reads {VERSION}")
        return {str(key): {str(name): float(limit) for name, limit in entry["short_windows"].items()}
                for key, entry in data["limiters"].items()}, None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return {}, _unusable(path, f"not the limits this run writes ({type(exc).__name__}: {exc})")


def _unusable(path: Path, why: str) -> str:
    return (f"{path} cannot be read ({why}): ignored, so this run learns the provider's short windows again "
            f"(a 429 or two); a good one replaces it once this run learns one.")


def recall(limiters: Mapping[str, Limiter], learnt: Mapping[str, Mapping[str, float]]) -> int:
    """Hand each limiter what the file says about its endpoint; how many buckets were recalled."""
    recalled = 0
    for key, limiter in limiters.items():
        for name, limit in learnt.get(key, {}).items():
            limiter.recall_short_window(name, limit)
            recalled += 1
    return recalled


def snapshot(limiters: Mapping[str, Limiter]) -> dict[str, Any]:
    """What the file holds for these limiters (only those that learnt something)."""
    kept = {key: {"short_windows": limiter.short_windows()} for key, limiter in sorted(limiters.items())}
    return {"version": VERSION, "limiters": {key: entry for key, entry in kept.items() if entry["short_windows"]}}


def exchange(run_dir: Path, limiters: Mapping[str, Limiter]) -> int:
    """The short windows these limiters learnt, added to `run_dir`'s file, and those other processes added
    there, recalled by these limiters: how many were new to them. The Ray runner's workers each call it on
    the run's `shards/` folder, so that a window one worker overran is paced by all from then on, instead of
    each worker paying for it with 429s of its own (an unreadable file is replaced)."""
    shared, _ = read_limits(run_dir)
    mine = snapshot(limiters)["limiters"]
    if any(name not in shared.get(key, {}) for key, entry in mine.items() for name in entry["short_windows"]):
        for key, entry in mine.items():
            shared.setdefault(key, {}).update(entry["short_windows"])
        write_limits(run_dir, {"version": VERSION,
                               "limiters": {key: {"short_windows": windows} for key, windows in shared.items()}})
    new = {key: {name: limit for name, limit in shared.get(key, {}).items() if name not in limiter.pacer.short}
           for key, limiter in limiters.items()}
    return recall(limiters, new)


def exchange_pauses(run_dir: Path, limiters: Mapping[str, Limiter]) -> int:
    """A pause of every request one worker's limiter entered (a spent window's `retry-after`, a limit signal, an
    open breaker), added to `run_dir`'s pauses.json, and the other workers' pauses from there taken by these
    limiters: how many limiters it paused. Without it, the workers that had not been refused yet kept sending
    into the window another one found spent, and each paid a 429 of its own for it."""
    path = run_dir / PAUSES
    try:
        shared = {str(key): float(until) for key, until in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        shared = {}  # none yet, or unreadable: this worker's pauses replace it
    now, clock = time.time(), time.monotonic()
    mine = {key: now + limiter.pause_until - clock for key, limiter in limiters.items() if limiter.pause_until > clock}
    if any(until > shared.get(key, 0.0) + 0.001 for key, until in mine.items()):
        shared.update({key: max(until, shared.get(key, 0.0)) for key, until in mine.items()})
        replace_whole(path, json.dumps(shared, sort_keys=True))
    paused = 0
    for key, limiter in limiters.items():
        until = clock + shared.get(key, 0.0) - now
        if until > limiter.pause_until + 0.001:
            limiter.pause_until = until
            paused += 1
    return paused


def write_limits(run_dir: Path, learnt: dict[str, Any]) -> None:
    replace_whole(run_dir / LIMITS, json.dumps(learnt, indent=2, sort_keys=True) + "\n")  # several workers write it
