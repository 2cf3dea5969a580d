"""What a hosted teacher gives the Batch API driver (factory/batch.py): its hooks, and the types they return.

The driver owns the ledger, the budget, polling, resending and the records; a provider fills in how a
batch is written, submitted, found again after a crash, polled and read (curator's batch processors are
the model: the base declares the steps, each provider implements them). So the driver has no
`provider ==` branches.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol


class Call(Protocol):
    """Calls one batch endpoint through the driver's retry loop: `await call(lambda: client.batches.list())`.

    `once=True` (submit_batch's create) marks a call that must not take effect twice: when its answer is
    lost (a timeout, a dropped connection, a 5xx: the provider may have accepted it), the driver looks the
    batch up with `find_batch` before sending it again, and when it is there the submission ends without
    returning (the driver records what it found)."""

    def __call__(self, make: Callable[[], Awaitable[Any]], *, once: bool = False) -> Awaitable[Any]: ...


@dataclass
class Outcome:
    """One result line: an answer (JSON of the provider's response), or a failure."""

    key: str
    data: dict[str, Any] | None = None
    error: str | None = None
    status: int | None = None
    retryable: bool = True


@dataclass
class BatchState:
    """The provider's word on a submitted batch."""

    status: str
    ended: bool
    answered: int      # requests finished, for the progress line
    info: Any = None   # the provider's object, handed back to `batch_outcomes` and `batch_failure`


class BatchTeacher(Protocol):
    """The hooks of a teacher that has a Batch API (OpenAI, Anthropic)."""

    sdk: Any  # the SDK module: its APIError is what `Call` retries
    # True when find_batch matches a tag the batch carries (certain); False when it matches by request count
    # and creation time, and the driver confirms a candidate by its results once it has ended.
    batch_tagged: bool

    def batch_entry(self, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """One line of a batch input file."""
        ...

    async def submit_batch(self, path: Path, *, file_id: str | None, tag: str, call: Call,
                           uploaded: Callable[[str], None]) -> str:
        """Submit the batch written at `path`; `tag` marks it so `find_batch` can find it after a crash.
        A provider that uploads a file first reports its id through `uploaded` (and is handed it back)."""
        ...

    async def find_batch(self, *, tag: str, count: int, since: float, call: Call) -> list[str]:
        """Ids of the batches at the provider that may be the one submitted as `tag` (count requests, not
        created before `since`): at most one when `batch_tagged`, else every candidate."""
        ...

    async def batch_status(self, provider_id: str, call: Call) -> BatchState: ...

    def batch_outcomes(self, state: BatchState, provider_id: str, files: Path, name: str,
                       call: Call) -> AsyncIterator[Outcome]:
        """The results of an ended batch, in any order; files it downloads go under `files`."""
        ...

    def batch_failure(self, state: BatchState) -> str | None:
        """Why the provider refused the whole batch (its requests will not be sent again as they are)."""
        ...


def epoch(value: Any) -> float:
    """A provider's timestamp (datetime, seconds, or ISO text) as seconds since the epoch."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
