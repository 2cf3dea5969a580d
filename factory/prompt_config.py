"""The `factory.prompts` section: where prompts come from (a file, a grid, a dataset, self-instruct).

Config only: the sources that run these settings are factory/grid.py, factory/prompt_dataset.py and
factory/self_instruct.py (see factory/sources.py); this module imports none of them.
"""
from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from apprentice.config import Strict

# Extensions a local dataset file may have, and the `datasets` builder each is read with.
DATASET_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
                   ".txt": "text"}


# ---- grid --------------------------------------------------------------------------------------------------
class AttributeValues(Strict):
    values: list[str] | None = None
    path: Path | None = Field(default=None, description="a text file, one value a line")
    weights: list[float] | None = Field(default=None, description="one weight per value (default: equal)")

    @model_validator(mode="after")
    def _one_source(self) -> "AttributeValues":
        if (self.values is None) == (self.path is None):
            raise ValueError("give either values: [...] or path: FILE")
        return self


class GridConfig(Strict):
    template: str = Field(description="the prompt, with {attribute} placeholders")
    attributes: dict[str, list[str] | AttributeValues]
    count: int | None = Field(default=None, ge=1, description="prompts to draw (default: every combination)")
    seed: int = 0

    @model_validator(mode="after")
    def _placeholders(self) -> "GridConfig":
        names = {field for _, field, _, _ in string.Formatter().parse(self.template) if field}
        missing, unused = sorted(names - set(self.attributes)), sorted(set(self.attributes) - names)
        if missing:
            raise ValueError(f"template uses {missing}, which attributes does not define")
        if unused:
            raise ValueError(f"attributes {unused} do not appear in the template")
        return self

    def resolved(self) -> list[tuple[str, list[str], list[float]]]:
        """(name, values, weights) for each attribute; file values read and checked."""
        out = []
        for name, spec in self.attributes.items():
            if isinstance(spec, list):
                spec = AttributeValues(values=spec)
            values = spec.values
            if values is None:
                path = spec.path
                if not path.is_file():  # type: ignore[union-attr]
                    raise ValueError(f"grid.attributes.{name}.path: {path} not found")
                values = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]  # type: ignore[union-attr]
            if not values:
                raise ValueError(f"grid.attributes.{name}: no values")
            weights = spec.weights or [1.0] * len(values)
            if len(weights) != len(values) or any(w <= 0 for w in weights):
                raise ValueError(f"grid.attributes.{name}.weights: one positive weight per value ({len(values)})")
            out.append((name, values, weights))
        return out


# ---- dataset -----------------------------------------------------------------------------------------------
class DatasetConfig(Strict):
    path: str = Field(description="a local file or folder, or a Hugging Face Hub dataset id")
    name: str | None = Field(default=None, description="the dataset's configuration (Hub datasets)")
    split: str = "train"
    column: str | None = Field(default=None, description="the column holding the prompt text")
    messages_column: str | None = Field(default=None, description="the column holding [{role, content}] messages")
    id_column: str | None = Field(default=None, description="prompt ids; default: the row index")
    attribute_columns: list[str] = Field(default_factory=list, description="columns kept as record attributes")
    reference_column: str | None = Field(default=None, description="the known answer, for the reference check")
    limit: int | None = Field(default=None, ge=1, description="only the first N rows")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        default=None, description="passed to datasets.load_dataset (with path: a folder, or json/csv/parquet)"
    )

    @model_validator(mode="after")
    def _one_prompt_column(self) -> "DatasetConfig":
        if (self.column is None) == (self.messages_column is None):
            raise ValueError("give either column: (the prompt text) or messages_column: (chat messages)")
        return self

    def is_local(self) -> bool:
        path = Path(self.path).expanduser()
        return path.exists() or path.suffix.lower() in DATASET_FORMATS or self.path.startswith((".", "/", "~"))


# ---- self-instruct -----------------------------------------------------------------------------------------
class Similarity(Strict):
    method: Literal["rouge_l", "minhash"] = "rouge_l"
    max: float = Field(default=0.7, gt=0, le=1, description="a new prompt more similar than this is dropped")


class SelfInstructConfig(Strict):
    seeds: Path = Field(description="seed prompts, a JSONL prompts file")
    count: int = Field(ge=1, description="new prompts wanted")
    per_request: int = Field(default=8, ge=1, le=100, description="seed examples shown (and new prompts asked) per request")
    rounds: int | None = Field(default=None, ge=1, description="at most this many requests")
    similarity: Similarity = Field(default_factory=Similarity)
    instruction: str | None = Field(default=None, description="the request text, with {examples} and optionally {n}")
    max_tokens: int | None = Field(default=None, ge=1, description="per answer; default: teacher params.max_tokens")
    seed: int = 0

    @field_validator("instruction")
    @classmethod
    def _placeholders(cls, text: str | None) -> str | None:
        if text is None:
            return text
        try:
            names = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        except ValueError as exc:
            raise ValueError(f"{exc}; write literal braces as {{{{ and }}}}") from None
        if "examples" not in names or names - {"examples", "n"}:
            raise ValueError("must contain {examples} and no placeholder other than {examples} and {n} "
                             f"(found {sorted(names)}); write literal braces as {{{{ and }}}}")
        return text

    @property
    def max_rounds(self) -> int:
        return self.rounds or max(10, 5 * math.ceil(self.count / self.per_request))


# ---- served -----------------------------------------------------------------------------------------------
class ServedWhere(Strict):
    """Which served requests become prompts (every condition given must hold)."""

    answered_by: Literal["student", "teacher"] | None = Field(default=None, description="who answered it")
    confidence_below: float | None = Field(
        default=None, le=0, description="the student's confidence (mean token logprob) was below this")
    fault: bool | None = Field(default=None, description="true: only answers served despite a fault; false: none")


class ServedSource(Strict):
    """`prompts: {served: DIR, where: {...}}` as one value, for the source (factory/served_log.py)."""

    dir: Path
    where: ServedWhere = Field(default_factory=ServedWhere)
    limit: int | None = None


# ---- the section ----------------------------------------------------------------------------------------------
class PromptsConfig(Strict):
    path: Path | None = Field(
        default=None, description="JSONL file, one prompt a line: {id?, prompt: str | [messages], attributes?}"
    )
    grid: GridConfig | None = Field(default=None, description="prompts from a template × attribute values")
    dataset: DatasetConfig | None = Field(
        default=None, description="prompts from a dataset (local file or folder, or Hub id) via `datasets`"
    )
    self_instruct: SelfInstructConfig | None = Field(
        default=None, description="new prompts written by the teacher from seed prompts, near-duplicates dropped"
    )
    served: Path | None = Field(
        default=None, description="the served log of `apprentice serve` (serve.log_dir): its requests as prompts"
    )
    where: ServedWhere | None = Field(default=None, description="with served: which requests, e.g. "
                                      "{answered_by: student, confidence_below: -0.5}")
    limit: int | None = Field(default=None, ge=1, description="with served: at most this many prompts")
    system: str | None = Field(default=None, description="system message prepended to prompts that have none")

    @model_validator(mode="after")
    def _one_source(self) -> "PromptsConfig":
        sources = [self.path, self.grid, self.dataset, self.self_instruct, self.served]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("give one source: either path: FILE.jsonl, grid: {template, attributes}, "
                             "dataset: {path, column}, self_instruct: {seeds, count} or served: DIR")
        if self.served is None and (self.where is not None or self.limit is not None):
            raise ValueError("where and limit choose among served requests: add served: DIR (serve.log_dir), "
                             "or remove them")
        return self

    @property
    def served_source(self) -> ServedSource | None:
        if self.served is None:
            return None
        return ServedSource(dir=self.served, where=self.where or ServedWhere(), limit=self.limit)
