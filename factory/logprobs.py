"""Teacher token logprobs: a columnar sidecar next to a run's JSONL, keyed by record id.

    RUN_DIR/logprobs/
        meta.json            top_k, token kind (ids | strings), tokenizer fingerprint, provider, model, source
        shard-000000.arrow   Arrow IPC files (uncompressed, memory-mappable), one row per record
        journal.bin          records not yet in a shard: length-prefixed, CRC-checked frames

Why this shape. A record's logprobs are a few KB to a few hundred KB (tokens × k × 8 bytes); inline in
the JSONL they would make every reader of the text pay for them, so they live here. Arrow IPC files are
zero-copy when memory-mapped, so the trainer reads one record's arrays without loading a shard, and
pyarrow is already installed with `datasets`. Nested lists hold the token strings of servers that return
no ids, which an npz could not hold without pickling.

Crash safety, the same promise as the JSONL. `write()` appends one whole frame to the journal with one
unbuffered `write()` *before* the pipeline appends the record's JSONL line, so a record on disk always
has its logprobs on disk. Every `shard_records` records the pending ones become a shard: written to a
`.tmp` file, then renamed (atomic), then the journal is emptied. After `kill -9` at any moment, opening
the writer again: drops a `.tmp` shard, cuts a torn last frame off the journal (its record has no JSONL
line yet: it was being written first), drops journal frames whose id a shard already holds (killed
between the rename and the truncation), and skips ids it already has (a record written here whose JSONL
line was not). So a resumed run neither loses nor duplicates an entry. Memory stays flat: at most
`shard_records` records are held in memory. Like the JSONL, nothing is fsynced: this survives a killed
process, not a power cut.

A finished run holds only shards; the journal of a running or killed run is read too.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from apprentice.tokens import TokenLogprobs

from .store import StoreError, id_key, replace_whole

if TYPE_CHECKING:
    from .recipe import TeacherConfig

SIDECAR = "logprobs"
META = "meta.json"
JOURNAL = "journal.bin"
FORMAT = 1
# Fields of meta.json that decide what the arrays mean: a resumed run must agree on all of them.
META_KEYS = ("format", "top_k", "token_kind", "tokenizer")
_FRAME = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
_MAGIC = b"LPJ1"


class LogprobsError(StoreError):
    """A sidecar that cannot be used as it is; the message names the directory and the fix."""


def _key(record_id: str) -> int:
    """The store's 64-bit resume key; ids that are not hex hashes (written by hand) are hashed first."""
    try:
        return id_key(record_id)
    except ValueError:
        return int(hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:16], 16)


# ---- tokenizer fingerprint ---------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any, name: str | None = None) -> dict[str, Any]:
    """Name and sha256 of the sorted (token, id) vocabulary, added tokens included.

    Two tokenizers with the same fingerprint map every id to the same token, which is what lets a
    student's log-probs be compared with a teacher's id by id. The ids are hashed with the tokens, since
    the same tokens in another order are a different tokenizer.
    """
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return {
        "name": name or getattr(tokenizer, "name_or_path", None),
        "vocab_sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        "vocab_size": len(vocab),
    }


# ---- journal frames ------------------------------------------------------------------------------------
def _encode_frame(record_id: str, lp: TokenLogprobs) -> bytes:
    import numpy as np

    count, k = lp.top_logprobs.shape
    header: dict[str, Any] = {"id": record_id, "n": count, "k": k, "ids": lp.sampled_ids is not None}
    if lp.tokens is not None:
        header["tokens"], header["top_tokens"] = lp.tokens, lp.top_tokens
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    parts = [struct.pack("<I", len(head)), head,
             np.ascontiguousarray(lp.sampled_logprobs, np.float32).tobytes(),
             np.ascontiguousarray(lp.top_logprobs, np.float32).tobytes()]
    if lp.sampled_ids is not None:
        parts += [np.ascontiguousarray(lp.sampled_ids, np.int32).tobytes(),
                  np.ascontiguousarray(lp.top_ids, np.int32).tobytes()]
    payload = b"".join(parts)
    return _FRAME.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[str, TokenLogprobs]:
    import numpy as np

    (head_len,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4 : 4 + head_len])
    count, k = header["n"], header["k"]
    pos = 4 + head_len

    def take(dtype: Any, shape: tuple[int, ...]) -> Any:
        nonlocal pos
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        array = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=pos).reshape(shape)
        pos += size
        return array

    out = TokenLogprobs(take(np.float32, (count,)), take(np.float32, (count, k)))
    if header["ids"]:
        out.sampled_ids, out.top_ids = take(np.int32, (count,)), take(np.int32, (count, k))
    if "tokens" in header:
        out.tokens, out.top_tokens = header["tokens"], header["top_tokens"]
    return header["id"], out


def _read_journal(path: Path) -> tuple[list[tuple[str, TokenLogprobs]], int, int]:
    """(records, bytes of whole frames, file size). Reading stops at the first torn or corrupt frame."""
    if not path.exists():
        return [], 0, 0
    data = path.read_bytes()
    records, pos = [], 0
    while pos + _FRAME.size <= len(data):
        magic, length, crc = _FRAME.unpack_from(data, pos)
        start, end = pos + _FRAME.size, pos + _FRAME.size + length
        if magic != _MAGIC or end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        records.append(_decode_payload(data[start:end]))
        pos = end
    return records, pos, len(data)


# ---- shards ----------------------------------------------------------------------------------------------
def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.arrow"))


def _write_shard(path: Path, records: list[tuple[str, TokenLogprobs]], meta: dict[str, Any]) -> None:
    """One Arrow IPC file, written to `.tmp` and renamed, so a shard is whole or absent."""
    import numpy as np
    import pyarrow as pa

    def lists(arrays: list[Any], dtype: Any, pa_type: Any) -> Any:
        sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        values = np.concatenate([np.ravel(a).astype(dtype, copy=False) for a in arrays])
        if offsets[-1] < 2**31:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa_type))
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa_type))

    columns: dict[str, Any] = {"id": pa.array([record_id for record_id, _ in records], pa.string())}
    numeric = [("sampled_logprobs", np.float32, pa.float32()), ("top_logprobs", np.float32, pa.float32())]
    if meta["token_kind"] == "ids":
        numeric += [("sampled_ids", np.int32, pa.int32()), ("top_ids", np.int32, pa.int32())]
    for name, dtype, pa_type in numeric:
        columns[name] = lists([getattr(lp, name) for _, lp in records], dtype, pa_type)
    if meta["token_kind"] == "strings":
        columns["tokens"] = pa.array([lp.tokens or [] for _, lp in records], pa.list_(pa.string()))
        columns["top_tokens"] = pa.array([[t for row in (lp.top_tokens or []) for t in row] for _, lp in records],
                                         pa.list_(pa.string()))
    table = pa.table(columns).replace_schema_metadata({"top_k": str(meta["top_k"])})
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


class _Shard:
    """A memory-mapped shard: numpy views of its columns, no copy until a record is read."""

    def __init__(self, path: Path, k: int) -> None:
        import pyarrow as pa

        self.path = path
        self.k = k
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        self.ids = table.column("id").to_pylist()
        self.columns: dict[str, tuple[Any, Any]] = {}
        for name in ("sampled_logprobs", "top_logprobs", "sampled_ids", "top_ids"):
            if name in table.column_names:
                column = table.column(name).combine_chunks()
                self.columns[name] = (column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False))
        self.strings = {name: table.column(name) for name in ("tokens", "top_tokens") if name in table.column_names}

    def record(self, row: int) -> TokenLogprobs:
        def get(name: str) -> Any:
            offsets, values = self.columns[name]
            return values[offsets[row] : offsets[row + 1]]

        top = get("top_logprobs").reshape(-1, self.k)
        out = TokenLogprobs(get("sampled_logprobs"), top)
        if "sampled_ids" in self.columns:
            out.sampled_ids, out.top_ids = get("sampled_ids"), get("top_ids").reshape(-1, self.k)
        if self.strings:
            out.tokens = self.strings["tokens"][row].as_py()
            flat = self.strings["top_tokens"][row].as_py()
            out.top_tokens = [flat[i : i + self.k] for i in range(0, len(flat), self.k)]
        return out


# ---- writing -----------------------------------------------------------------------------------------------
def read_meta(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SIDECAR / META
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _settle_meta(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write meta.json for a new sidecar; for an existing one, check that the arrays mean the same."""
    path = directory / META
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key in META_KEYS if before.get(key) != meta.get(key)]
        if changed:
            diffs = "; ".join(f"{key}: was {before.get(key)!r}, now {meta.get(key)!r}" for key in changed)
            raise LogprobsError(
                f"{directory} holds logprobs of another teacher tokenizer or settings ({diffs}); "
                "use a new output directory, or delete the run directory to start over"
            )
        return before
    replace_whole(path, json.dumps(meta, indent=2) + "\n")
    return meta


class LogprobsWriter:
    """Appends records' logprobs to a run's sidecar; see the module docstring for the crash story."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], shard_records: int = 256) -> None:
        self.directory = Path(run_dir) / SIDECAR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = _settle_meta(self.directory, {"format": FORMAT, **meta})
        self.k = int(self.meta["top_k"])
        self.shard_records = shard_records
        self.repaired_bytes = 0
        self.dropped_shards: list[str] = []
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()
        self._ids: set[int] = set()
        shards = _shards(self.directory)
        for shard in shards:
            try:
                ids = _Shard(shard, self.k).ids
            except Exception:  # noqa: BLE001 - an unreadable shard (a power cut, a hand edit)
                # Its records keep their JSONL lines but lose their logprobs; the trainer falls back to
                # cross-entropy for them and counts them. Kept aside, not deleted, for whoever wants to look.
                shard.rename(shard.with_suffix(".arrow.corrupt"))
                self.dropped_shards.append(shard.name)
                continue
            self._ids.update(_key(record_id) for record_id in ids)
        self._next = 1 + max((int(s.stem.split("-")[1]) for s in shards), default=-1)
        journal = self.directory / JOURNAL
        records, good, size = _read_journal(journal)
        if good < size:
            with journal.open("rb+") as handle:
                handle.truncate(good)
            self.repaired_bytes = size - good
        self._pending: list[tuple[str, TokenLogprobs]] = []
        for record_id, lp in records:
            if _key(record_id) not in self._ids:
                self._ids.add(_key(record_id))
                self._pending.append((record_id, lp))
        self._journal = open(journal, "ab", buffering=0)
        if records:
            self.flush()  # fold what a killed run left in the journal into a shard; this empties it

    def __contains__(self, record_id: str) -> bool:
        return _key(record_id) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def write(self, record_id: str, lp: TokenLogprobs) -> bool:
        """Store one record's logprobs durably (against a killed process); False when already stored."""
        key = _key(record_id)
        if key in self._ids:
            return False
        if lp.top_logprobs.ndim != 2 or lp.top_logprobs.shape[1] != self.k:
            raise ValueError(f"logprobs of {record_id}: shape {lp.top_logprobs.shape}, expected (tokens, {self.k})")
        if (lp.sampled_ids is None) != (self.meta["token_kind"] == "strings"):
            raise ValueError(f"logprobs of {record_id} do not match token_kind={self.meta['token_kind']!r}")
        self._journal.write(_encode_frame(record_id, lp))
        self._ids.add(key)
        self._pending.append((record_id, lp))
        if len(self._pending) >= self.shard_records:
            self.flush()
        return True

    def flush(self) -> None:
        """Pending records → one new shard; then the journal, now redundant, is emptied."""
        if self._pending:
            _write_shard(self.directory / f"shard-{self._next:06d}.arrow", self._pending, self.meta)
            self._next += 1
            self._pending = []
        if os.fstat(self._journal.fileno()).st_size:
            self._journal.truncate(0)

    def close(self) -> None:
        if self._journal.closed:
            return
        self.flush()
        self._journal.close()


async def open_sidecar(run_dir: Path, teacher_config: "TeacherConfig", teacher: Any) -> LogprobsWriter | None:
    """The writer for a run whose recipe asks for `teacher.logprobs`, else None.

    The teacher describes its logprobs (`logprobs_meta()`: token kind, tokenizer fingerprint); loading a
    tokenizer to fingerprint it can take a moment, so it runs in a thread.
    """
    import asyncio

    settings = teacher_config.logprobs
    if settings is None:
        return None
    # Every teacher that can give logprobs describes them (the recipe refuses teacher.logprobs for the others).
    info = await asyncio.to_thread(teacher.logprobs_meta)
    meta = {
        "top_k": settings.top_k,
        "token_kind": info.get("token_kind", "ids"),
        "tokenizer": info.get("tokenizer"),
        "provider": teacher_config.provider,
        "model": teacher_config.model,
        "source": info.get("source"),
    }
    if info.get("note"):
        meta["note"] = info["note"]
    return LogprobsWriter(Path(run_dir), meta, settings.shard_records)


# ---- reading -----------------------------------------------------------------------------------------------
class LogprobsIndex:
    """Random access by record id to a run's sidecar, shards memory-mapped: what the trainer reads from.

    `get(id)` returns numpy views into the mapped files (read-only; copy to modify). Records still in the
    journal of a running or killed run are read too (at most `shard_records` of them, in memory).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        directory = self.run_dir / SIDECAR
        meta = read_meta(self.run_dir)
        if meta is None:
            raise LogprobsError(
                f"{directory}: no teacher logprobs in this run; generate it with "
                "factory.teacher.logprobs: {top_k: 20} (a new output_dir)"
            )
        self.meta = meta
        self.k = int(meta["top_k"])
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int]] = {}
        for path in _shards(directory):
            try:
                shard = _Shard(path, self.k)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
                raise LogprobsError(
                    f"{path}: unreadable logprobs shard ({type(exc).__name__}); run `python -m factory generate` "
                    "with the run's recipe once (it sets the shard aside) or move the file away"
                ) from None
            number = len(self._shards)
            self._shards.append(shard)
            for row, record_id in enumerate(shard.ids):
                self._where.setdefault(record_id, (number, row))
        self._journal: dict[str, TokenLogprobs] = {}
        for record_id, lp in _read_journal(directory / JOURNAL)[0]:
            if record_id not in self._where:
                self._journal.setdefault(record_id, lp)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._where or record_id in self._journal

    def __len__(self) -> int:
        return len(self._where) + len(self._journal)

    def ids(self) -> Iterator[str]:
        yield from self._where
        yield from self._journal

    def get(self, record_id: str) -> TokenLogprobs | None:
        where = self._where.get(record_id)
        if where is not None:
            return self._shards[where[0]].record(where[1])
        return self._journal.get(record_id)


def iter_logprobs(run_dir: Path) -> Iterator[tuple[str, TokenLogprobs]]:
    """(record id, logprobs) for every record of a run's sidecar, each id once, shards in order."""
    index = LogprobsIndex(run_dir)
    for record_id in index.ids():
        lp = index.get(record_id)
        assert lp is not None
        yield record_id, lp


def read_logprobs(run_dir: Path) -> dict[str, TokenLogprobs]:
    """Every record's logprobs, by id. For small runs and tests; the trainer uses LogprobsIndex."""
    return dict(iter_logprobs(run_dir))
