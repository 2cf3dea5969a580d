"""Online dispatch: prompts stream from disk through a bounded queue to a fixed pool of workers, each
sending one work item at a time through the decider (limiter, cache, checks, store). Memory does not
grow with the number of prompts."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .decide import Decider, Stop, WorkItem
from .prompts import iter_prompts


class OnlineDispatch:
    note = None  # nothing to add to the progress line

    def __init__(self, decider: Decider, prompts_path: Path, *, system: str | None, limit: int | None,
                 concurrency: int, stop: Stop) -> None:
        self.decider = decider
        self.prompts_path = prompts_path
        self.system = system
        self.limit = limit
        self.concurrency = concurrency
        self.stop = stop

    def summary(self) -> dict[str, Any] | None:
        return None

    async def execute(self) -> None:
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * self.concurrency)

        async def produce() -> None:
            sent = 0
            for prompt in iter_prompts(self.prompts_path, self.system):
                if self.stop.stopping or (self.limit is not None and sent >= self.limit):
                    break
                sent += 1
                for item in self.decider.open_items(prompt):
                    await queue.put(item)
            for _ in range(self.concurrency):
                await queue.put(None)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                await self.decider.process(item)

        tasks = [asyncio.create_task(produce())] + [asyncio.create_task(work()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            # The producer can be parked on a full queue after the workers stopped.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
