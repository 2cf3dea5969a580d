"""Run-wide dedup and contamination: `exact_dup`, `near_dup` (MinHash LSH), `contamination` (golden sets).

The dedup checks remember accepted samples only (the pipeline calls `remember` after a sample passed
every check), so a sample rejected by a later check never hides a good one, and the first accepted
copy of an answer is the one that stays. On resume the pipeline replays accepted.jsonl into `remember`
(see `quality_checks.base.prime`), so a resumed run rejects the same duplicates as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from apprentice.text import fold_text

from .base import PASS, Check, Verdict
from .lsh import BandIndex, optimal_bands
from .minhash import MinHasher, text_shingles
from .registry import CheckConfigError, CheckOptions, register

if TYPE_CHECKING:
    import numpy as np

    from factory.records import Sample


@register("exact_dup")
class ExactDup(Check):
    """Same answer after casefolding, dropping punctuation and collapsing whitespace.

    The index maps a 64-bit hash of the normalized text to the first id: about 170 bytes per accepted
    sample. Two different texts share a 64-bit hash with odds of about n²/2**65: none in practice.
    """
    run_wide = True
    name = "exact_dup"

    def __init__(self, options: CheckOptions | None = None) -> None:
        self.first: dict[int, str] = {}
        self._last: tuple[str, int] | None = None

    @staticmethod
    def key(text: str) -> int:
        digest = hashlib.blake2b(fold_text(text).encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def __call__(self, sample: "Sample") -> Verdict:
        key = self.key(sample.text)
        self._last = (sample.id, key)
        first = self.first.get(key)
        if first is not None:
            return Verdict(False, f"exact duplicate of {first}")
        return PASS

    def remember(self, sample: "Sample") -> None:
        last = self._last
        key = last[1] if last is not None and last[0] == sample.id else self.key(sample.text)
        self.first.setdefault(key, sample.id)


class MinHashOptions(CheckOptions):
    threshold: float = Field(default=0.8, gt=0, le=1, description="estimated Jaccard similarity that counts as a match")
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations: more is slower and more exact")
    shingle: int = Field(default=3, ge=1, le=16, description="words per shingle")


class _Signatures:
    """Signatures by row, in fixed-size numpy blocks: no copy as the run grows, 4 bytes per permutation."""

    BLOCK = 4096

    def __init__(self, num_perm: int) -> None:
        self.num_perm = num_perm
        self.blocks: list[np.ndarray] = []
        self.size = 0

    def append(self, signature: "np.ndarray") -> int:
        import numpy as np

        row = self.size
        if row % self.BLOCK == 0:
            self.blocks.append(np.empty((self.BLOCK, self.num_perm), dtype=np.uint32))
        self.blocks[-1][row % self.BLOCK] = signature
        self.size += 1
        return row

    def __getitem__(self, row: int) -> "np.ndarray":
        return self.blocks[row // self.BLOCK][row % self.BLOCK]


class _Index:
    """A band index (`quality_checks.lsh.BandIndex`) over rows, with the signatures kept to confirm candidates.

    LSH candidates are pairs whose bands collide; some are below the threshold, so each is confirmed by
    comparing signatures, and the reason names the closest one (the earliest, of equals). Because of
    that confirmation a false candidate costs one comparison while a missed one is a duplicate kept, so
    the bands are chosen to favour recall (datasketch's weights 0.05 / 0.95: 16 bands of 8 at 128
    permutations and threshold 0.8, which makes a pair at Jaccard 0.8 a candidate 95% of the time,
    against 40% with the even weights).
    """

    WEIGHTS = (0.05, 0.95)  # (false positive, false negative)

    def __init__(self, options: MinHashOptions) -> None:
        self.threshold = options.threshold
        self.hasher = MinHasher(options.num_perm, options.shingle)
        self.bands = BandIndex(*optimal_bands(options.threshold, options.num_perm, *self.WEIGHTS))
        self.signatures = _Signatures(options.num_perm)
        self.labels: list[str] = []
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (signature, its band keys)

    def prepare(self, text: str) -> "np.ndarray | None":
        """The signature of a text, or None when it has no words to compare."""
        hashes = text_shingles(text, self.hasher.shingle)
        return self.hasher.signature_of_hashes(hashes) if hashes.size else None

    def _keys(self, signature: "np.ndarray") -> "np.ndarray":
        last = self._last
        if last is None or last[0] is not signature:
            last = self._last = (signature, self.bands.keys(signature))
        return last[1]

    def closest(self, signature: "np.ndarray") -> tuple[str, float] | None:
        import numpy as np

        best_row, best = -1, -1.0
        for row in sorted(self.bands.candidates(self._keys(signature))):
            similarity = np.count_nonzero(self.signatures[row] == signature) / len(signature)
            if similarity > best:
                best_row, best = row, similarity
        if best_row < 0 or best < self.threshold:
            return None
        return self.labels[best_row], float(best)

    def add(self, label: str, signature: "np.ndarray") -> None:
        self.bands.add(self._keys(signature))
        self.signatures.append(signature)
        self.labels.append(label)
        self._last = None


@register("near_dup", MinHashOptions)
class NearDup(Check):
    """An answer whose word shingles overlap an accepted answer's by at least `threshold` (Jaccard,
    estimated with MinHash), found online with a MinHash LSH band index (`quality_checks.lsh`).

    Memory grows with the accepted samples: one signature (4 bytes per permutation), the band keys
    (12 bytes per band) and the id each, about 0.8 KB per sample at 128 permutations; see
    benchmarks/results/dedup.md for the figures at 100,000 and 1,000,000 samples.
    """
    run_wide = True
    name = "near_dup"

    def __init__(self, options: MinHashOptions) -> None:
        self.index = _Index(options)
        self._last: tuple[str, np.ndarray | None] | None = None

    def __call__(self, sample: "Sample") -> Verdict:
        prepared = self.index.prepare(sample.text)
        self._last = (sample.id, prepared)
        if prepared is None:
            return PASS  # nothing to compare; `empty` is the check for that
        match = self.index.closest(prepared)
        if match is not None:
            return Verdict(False, f"near-duplicate of {match[0]} (Jaccard ~{match[1]:.2f})", match[1])
        return PASS

    def remember(self, sample: "Sample") -> None:
        last = self._last
        prepared = last[1] if last is not None and last[0] == sample.id else self.index.prepare(sample.text)
        self._last = None
        if prepared is not None:
            self.index.add(sample.id, prepared)


class ContaminationOptions(MinHashOptions):
    path: Path = Field(default=Path("data/golden"), description="a golden-set .jsonl file, or a folder of them")
    threshold: float = Field(default=0.7, gt=0, le=1)
    shingle: int = Field(default=2, ge=1, le=16, description="words per shingle (prompts are short: 2)")


def user_text(prompt: Any) -> str:
    """The user turns of a prompt (a string or a list of messages); the system prompt is shared by many
    prompts and would make unrelated prompts look alike."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(
            str(m.get("content") or "") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"
        )
    raise ValueError('"prompt" must be a string or a list of messages')


def golden_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob("*.jsonl"))
    return []


@register("contamination", ContaminationOptions)
class Contamination(Check):
    """Drop a sample whose prompt is near a prompt of a golden (evaluation) set: training on the test
    questions would make the eval gate lie. The reason names the golden file and line (or id)."""

    name = "contamination"

    def __init__(self, options: ContaminationOptions) -> None:
        files = golden_files(options.path)
        if not files:
            raise CheckConfigError(
                f"no golden set at {options.path} (a .jsonl file, or a folder of them, with "
                '{"prompt": ..., "reference": ...} lines); fix the path or drop the check',
                "path",
            )
        self.index = _Index(options)
        for file in files:
            with file.open("r", encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                        text = user_text(item["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                        raise CheckConfigError(f"{file}:{number}: not a golden line with a prompt ({exc})", "path") from None
                    label = f"{file.name}#{item['id']}" if item.get("id") is not None else f"{file.name}:{number}"
                    prepared = self.index.prepare(text)
                    if prepared is not None:
                        self.index.add(label, prepared)
        if not self.index.labels:
            raise CheckConfigError(f"the golden set at {options.path} holds no prompts", "path")
        self._verdicts: dict[str, Verdict] = {}  # by prompt: the n samples of a prompt are checked once

    def __call__(self, sample: "Sample") -> Verdict:
        text = user_text(sample.prompt)
        verdict = self._verdicts.get(text)
        if verdict is None:
            prepared = self.index.prepare(text)
            match = self.index.closest(prepared) if prepared is not None else None
            verdict = PASS if match is None else Verdict(
                False, f"prompt near golden {match[0]} (Jaccard ~{match[1]:.2f})", match[1]
            )
            if len(self._verdicts) >= 4096:
                self._verdicts.clear()
            self._verdicts[text] = verdict
        return verdict
