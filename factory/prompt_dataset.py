"""Prompts from a dataset, through the `datasets` library.

    prompts:
      dataset:
        path: data/questions.parquet      # a JSON/JSONL/CSV/Parquet file, a folder (save_to_disk or data files),
                                          # or a Hugging Face Hub id such as openai/gsm8k (needs the network)
        name: main                        # the Hub config, when the dataset has several
        split: train
        column: question                  # a text column …
        # messages_column: messages       # … or a column of chat messages [{role, content}, …]
        id_column: id                     # default: the row index
        attribute_columns: [topic]        # kept on every record, like a grid's attributes
        reference_column: answer          # the known answer, for the `reference` check
        limit: 1000

Rows stream (Hub and files through `streaming=True`, saved folders memory-mapped) into the run directory as
`prompts.dataset.jsonl`, one standard prompt line each, and the run reads that file like any prompts file,
so a resumed run sees the same prompts. A local source is read again on every run (it is cheap and the
file may have been fixed); a Hub dataset is read once and the file reused while the recipe's `dataset:` is
unchanged, so a resume needs no network.
"""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from rich.markup import escape

from .prompt_config import DATASET_FORMATS as FORMATS
from .prompt_config import DatasetConfig
from .prompts import MAX_REPORTED, PromptError, SourceEnv, parse_messages

DATASET_FILE = "prompts.dataset.jsonl"
SOURCE_FILE = "prompts.dataset.source.json"  # the `dataset:` section that wrote DATASET_FILE
KEY = "factory.prompts.dataset"


def _open(config: DatasetConfig) -> Iterable[dict[str, Any]]:
    """The rows of the chosen split, streamed; raises PromptError naming the key and the fix."""
    import datasets

    path = Path(config.path).expanduser()
    if config.is_local() and not path.exists():
        raise PromptError(f"{KEY}.path: {path} not found")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))  # memory-mapped: rows are read as they are asked for
        if isinstance(loaded, datasets.DatasetDict):
            if config.split not in loaded:
                raise PromptError(f"{KEY}.split: no split {config.split!r} in {path}; splits: {sorted(loaded)}")
            loaded = loaded[config.split]
        return loaded
    if path.is_file():
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise PromptError(f"{KEY}.path: {path}: unknown format; give a .jsonl, .json, .csv or .parquet file")
        args: dict[str, Any] = {"path": builder, "data_files": str(path)}
    else:
        args = {"path": str(path) if path.is_dir() else config.path, "name": config.name,
                "data_files": config.data_files}
    try:
        return datasets.load_dataset(**args, split=config.split, streaming=True)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise PromptError(f"{KEY}.split: {exc}") from None
        raise PromptError(f"{KEY}: {config.path}: {exc}") from None
    except (ConnectionError, OSError) as exc:
        if config.is_local():
            raise PromptError(f"{KEY}.path: {config.path}: {exc}") from None
        raise PromptError(
            f"{KEY}.path: could not load {config.path!r} from the Hugging Face Hub ({exc}). Without a network, "
            "give a local file (JSONL, CSV, Parquet) or a folder saved with Dataset.save_to_disk; "
            "with one, check the id and unset HF_HUB_OFFLINE"
        ) from None
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each becomes a recipe error
        raise PromptError(f"{KEY}.path: could not load {config.path!r}: {type(exc).__name__}: {exc}") from None


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is None:  # a streamed JSON file knows its columns only from its first row
        first = next(iter(rows), None)
        names = list(first) if first is not None else []
    return list(names)


def _check_columns(config: DatasetConfig, columns: list[str]) -> None:
    wanted = [("column", config.column), ("messages_column", config.messages_column),
              ("id_column", config.id_column), ("reference_column", config.reference_column)]
    wanted += [(f"attribute_columns.{i}", name) for i, name in enumerate(config.attribute_columns)]
    missing = [f"{KEY}.{key}: no column {name!r} in {config.path} (split {config.split}); columns: {columns}"
               for key, name in wanted if name is not None and name not in columns]
    if missing:
        raise PromptError("\n".join(missing))


def _messages(value: Any) -> list[dict[str, str]]:
    """A conversation as a prompt: role and content of each message, up to its last user turn (a chat
    dataset's answers are the teacher's to write)."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} has no role and content")
        messages.append({"role": message["role"], "content": message["content"]})
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    return parse_messages(messages[: users[-1] + 1] if users else messages)


def _lines(config: DatasetConfig, rows: Iterable[dict[str, Any]], errors: list[str]) -> Iterator[str]:
    for index, row in enumerate(islice(rows, config.limit)):
        try:
            if config.column is not None:
                value = row[config.column]
                if not isinstance(value, str):
                    raise ValueError(f"{config.column!r} is {type(value).__name__}, not text")
                parse_messages(value)
                prompt: Any = value
            else:
                prompt = _messages(row[config.messages_column])
            prompt_id = row[config.id_column] if config.id_column else index
            if prompt_id is None or str(prompt_id) == "":
                raise ValueError(f"{config.id_column!r} is empty")
        except ValueError as exc:
            errors.append(f"row {index}: {exc}")
            continue
        line: dict[str, Any] = {"id": str(prompt_id), "prompt": prompt}
        if config.attribute_columns:
            line["attributes"] = {name: row[name] for name in config.attribute_columns}
        if config.reference_column is not None and row[config.reference_column] is not None:
            line["reference"] = str(row[config.reference_column])
        yield json.dumps(line, ensure_ascii=False, default=str) + "\n"


def write_dataset(config: DatasetConfig, run_dir: Path, console: Any = None) -> Path:
    """Write the selected rows as a prompts file in the run directory (atomically); return its path."""
    path = run_dir / DATASET_FILE
    source = run_dir / SOURCE_FILE
    recorded = config.model_dump(mode="json")
    if not config.is_local() and path.is_file() and source.is_file():
        if json.loads(source.read_text(encoding="utf-8")) == recorded:
            if console is not None:
                console.print(escape(f"prompts from {path} (written from {config.path} earlier; delete it to read "
                                     "again)"), highlight=False)
            return path
    rows = _open(config)
    _check_columns(config, _columns(rows))
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    errors: list[str] = []
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for line in _lines(config, rows, errors):
            handle.write(line)
            count += 1
    if errors:
        tmp.unlink()
        more = f"\n  … and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise PromptError(f"{KEY}: {len(errors)} bad row(s) in {config.path} (split {config.split}); "
                          "nothing was sent:\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more)
    if count == 0:
        tmp.unlink()
        raise PromptError(f"{KEY}: {config.path} (split {config.split}) has no rows")
    tmp.replace(path)
    source.write_text(json.dumps(recorded), encoding="utf-8")
    if console is not None:
        console.print(escape(f"prompts: {count} rows of {config.path} (split {config.split}) → {path}"), highlight=False)
    return path


async def write_prompts(config: DatasetConfig, env: SourceEnv) -> Path:
    """The dataset as a prompts file in the run directory (the prompt-source signature, factory/sources.py)."""
    return write_dataset(config, env.run_dir, env.console)
