"""Knowledge-distillation exports: a run's samples with the teacher's top-k token logprobs from its sidecar
(factory/logprobs.py), in the dataset formats of two trainers that distil offline.

The token ids are the sidecar's, as the teacher generated them: never text re-encoded into ids, which is how
KD data goes wrong when the re-encoding splits or merges tokens differently from the teacher's sampling.
Both formats therefore need a sidecar of ids (the local and vllm teachers, or an OpenAI-compatible server
with `logprobs.token_ids: true`); a run without one is refused with that fix.

- `axolotl-kd` (JSONL): Axolotl's KD dataset rows as its v2 chat-template strategy reads them
  (src/axolotl/integrations/kd/chat_template.py, `ChatTemplateStrategyWithKDv2`, in axolotl-ai-cloud/axolotl):
  `messages`, and per completion token `target_token_ids` (k ids) and `logprobs` (k logprobs, same order).
  Axolotl tokenizes `messages` itself and lines the per-token rows up with the LAST tokens of the
  conversation, so the student's chat template must end the assistant turn with the teacher's last sampled
  token (the end of turn); a template that writes more after it (a newline) shifts every row by one. For the
  same reason a sample the teacher did not finish (finish_reason length: the template closes the turn with a
  token the teacher never sampled) is left out and counted.
- `distillkit` (parquet): DistillKit's offline rows with uncompressed top-k, which its compressor reads as
  they are (distillkit/compression/compressor.py, `decompress_to_sparse`: `token_ids` and `top_values`, in
  arcee-ai/DistillKit): `input_ids` (the prompt through the teacher's chat template, then the teacher's
  sampled ids), and for each position j < len(input_ids) - 1 the teacher's distribution over token j + 1 (as
  DistillKit's vLLM capture stores prompt logprobs), `top_values` being log-probabilities (`log_values`).
  Only completion tokens have a teacher distribution: prompt positions hold the next token at logprob 0, and
  `labels` (-100 on the prompt) keeps them out of the loss.

Rows shorter than k (a server that returned fewer alternatives) are cut, per sample, to the narrowest row in
axolotl-kd (its strategy takes one k per sample) and padded with id 0 at logprob -inf in distillkit (as
DistillKit's own capture pads). A sample without logprobs is left out and counted.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from apprentice.errors import ApprenticeError

from .builtin import resolve_model
from .hf import encode_chat
from .logprobs import LogprobsIndex, read_meta, tokenizer_fingerprint
from .review_ledger import ReviewError, reviewed_records

KD_FORMATS = ("axolotl-kd", "distillkit")
FIX = "generate the run with factory.teacher.logprobs: {top_k: 20, token_ids: true} (into a new output_dir)"


class KDExportError(ApprenticeError):
    """A run whose logprobs cannot make a KD export; the message names the run and the fix."""


def open_sidecar(run_dir: Path) -> tuple[LogprobsIndex, dict[str, Any]]:
    """The run's sidecar and its meta.json, refused unless it holds token ids."""
    meta = read_meta(run_dir)
    if meta is None:
        raise KDExportError(f"{run_dir}: no logprobs sidecar ({Path(run_dir) / 'logprobs'}), and the KD formats carry "
                            f"the teacher's token logprobs: {FIX}")
    if meta.get("token_kind") != "ids":
        raise KDExportError(f"{run_dir}: the sidecar holds token strings without ids ({meta.get('note', 'hosted API')}); "
                            f"the KD formats need the teacher's token ids: {FIX} on a server that returns them "
                            "(vLLM), or provider local or vllm")
    return LogprobsIndex(run_dir), meta


def _records(run_dir: Path, rejected: bool) -> Iterator[dict[str, Any]]:
    try:
        for _, _, record in reviewed_records(run_dir, rejected=rejected):
            yield record
    except ReviewError as exc:
        raise KDExportError(str(exc)) from None


def _rows(lp: Any) -> tuple[list[list[int]], list[list[float]]]:
    """The top-k ids and logprobs of one completion, padding (id -1 / -inf) dropped from each row."""
    ids, values = [], []
    for row_ids, row_lp in zip(lp.top_ids.tolist(), lp.top_logprobs.tolist()):
        keep = [i for i, (t, v) in enumerate(zip(row_ids, row_lp)) if t >= 0 and math.isfinite(v)]
        ids.append([row_ids[i] for i in keep])
        values.append([row_lp[i] for i in keep])
    return ids, values


def axolotl_rows(run_dir: Path, rejected: bool, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    index, _ = open_sidecar(run_dir)
    for record in _records(run_dir, rejected):
        lp = index.get(record["id"])
        if lp is None or len(lp) == 0:
            counts["without_logprobs"] += 1
            continue
        if record.get("finish_reason") == "length":
            counts["cut_off"] += 1
            continue
        ids, values = _rows(lp)
        width = min(len(row) for row in ids)
        if width == 0:
            counts["without_logprobs"] += 1
            continue
        counts["exported"] += 1
        yield {"messages": record["prompt"] + record["completion"],
               "target_token_ids": [row[:width] for row in ids], "logprobs": [row[:width] for row in values]}


def write_axolotl_kd(run_dir: Path, path: Path, rejected: bool) -> dict[str, int]:
    counts = {"exported": 0, "without_logprobs": 0, "cut_off": 0}
    with path.open("w", encoding="utf-8") as handle:
        for row in axolotl_rows(run_dir, rejected, counts):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts


def teacher_tokenizer(meta: dict[str, Any], run_dir: Path) -> Any:
    """The teacher's tokenizer named in meta.json, checked against the sidecar's fingerprint."""
    from transformers import AutoTokenizer

    fingerprint = meta.get("tokenizer") or {}
    name = fingerprint.get("name")
    if not name or not fingerprint.get("vocab_sha256"):
        raise KDExportError(f"{run_dir}: the sidecar names no teacher tokenizer, and distillkit rows need the prompt's "
                            f"token ids: {FIX}, with logprobs.tokenizer set to the served model's tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KDExportError(f"{run_dir}: the teacher's tokenizer {name} could not be loaded ({first}); distillkit rows "
                            "need it for the prompt's token ids: make it available (log in, or run once online)") from None
    if tokenizer_fingerprint(tokenizer, name)["vocab_sha256"] != fingerprint["vocab_sha256"]:
        raise KDExportError(f"{run_dir}: the tokenizer {name} loaded now is not the one the teacher used (its vocabulary "
                            "differs from the sidecar's fingerprint); export with the teacher's own tokenizer")
    return tokenizer


def distillkit_rows(run_dir: str, rejected: bool, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    index, meta = open_sidecar(Path(run_dir))
    tokenizer = teacher_tokenizer(meta, Path(run_dir))
    k = int(meta["top_k"])
    for record in _records(Path(run_dir), rejected):
        lp = index.get(record["id"])
        if lp is None or len(lp) == 0:
            counts["without_logprobs"] += 1
            continue
        prompt = encode_chat(tokenizer, record["prompt"])  # as the local teacher encodes its prompts
        sampled = lp.sampled_ids.tolist()
        input_ids = prompt + sampled
        ids, values = _rows(lp)
        # Position j predicts token j + 1: the prompt's positions but its last predict prompt tokens.
        token_ids = [[token] + [0] * (k - 1) for token in prompt[1:]]
        top_values = [[0.0] + [-math.inf] * (k - 1) for _ in prompt[1:]]
        for row_ids, row_lp in zip(ids, values):
            token_ids.append(row_ids + [0] * (k - len(row_ids)))
            top_values.append(row_lp + [-math.inf] * (k - len(row_lp)))
        counts["exported"] += 1
        yield {"input_ids": input_ids, "labels": [-100] * len(prompt) + sampled,
               "token_ids": token_ids[: len(input_ids) - 1], "top_values": top_values[: len(input_ids) - 1]}


def write_distillkit(run_dir: Path, path: Path, rejected: bool) -> dict[str, int]:
    from datasets import Dataset, Features, Sequence, Value

    counts = {"exported": 0, "without_logprobs": 0}
    teacher_tokenizer(open_sidecar(run_dir)[1], run_dir)  # refuse here: datasets wraps a generator's errors
    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "token_ids": Sequence(Sequence(Value("int32"))),
                         "top_values": Sequence(Sequence(Value("float32")))})
    generated: list[dict[str, int]] = []

    def rows(run_dir: str, rejected: bool) -> Iterator[dict[str, Any]]:
        tally = {"exported": 0, "without_logprobs": 0}
        generated.append(tally)
        yield from distillkit_rows(run_dir, rejected, tally)

    with tempfile.TemporaryDirectory(prefix="apprentice-export-") as cache:
        dataset = Dataset.from_generator(rows, gen_kwargs={"run_dir": str(run_dir), "rejected": rejected},
                                         features=features, cache_dir=cache)
        dataset.to_parquet(str(path))
        counts["exported"] = len(dataset)
        del dataset
    counts["without_logprobs"] = generated[-1]["without_logprobs"] if generated else 0
    return counts


def kd_card_lines(run_dir: Path, fmt: str) -> list[str]:
    """The dataset card's section on the logprobs: which tokenizer, how many alternatives, how to load them."""
    meta = read_meta(run_dir) or {}
    tokenizer = (meta.get("tokenizer") or {}).get("name") or "unknown"
    lines = ["## Teacher logprobs", "",
             f"Top-{meta.get('top_k', '?')} token logprobs per completion token from the teacher ({meta.get('provider', '?')} "
             f"/ `{meta.get('model', '?')}`), at temperature 1 over the raw logits, with the token ids of the tokenizer "
             f"`{tokenizer}` as the teacher sampled them (not re-encoded text). A student must share that tokenizer.", ""]
    if fmt == "axolotl-kd":
        lines += ["Axolotl (`plugins: [axolotl.integrations.kd.KDPlugin]`, `kd_trainer: true`):", "", "```yaml",
                  "datasets:", "  - path: data.jsonl", "    ds_type: json",
                  "    type: axolotl.integrations.kd.chat_template", "    field_messages: messages",
                  "    logprobs_field: logprobs", "    temperature: 1.0", "```"]
    else:
        vocab = (meta.get("tokenizer") or {}).get("vocab_size", "VOCAB_SIZE")
        lines += ["DistillKit: `input_ids`, `labels` (-100 on the prompt), and per position j the teacher's top-k over "
                  "token j + 1 as `token_ids` and `top_values` (log-probabilities; prompt positions hold the next token "
                  "at 0 and are masked by `labels`). Pack it to your sequence length with DistillKit's "
                  "`python -m distillkit.pack_logits --dataset OWNER/NAME --split train --max-len 4096 --output packed` "
                  "(it trims `input_ids` and `labels` to the signal's length), then:", "", "```yaml",
                  "dataset:", "  train_dataset: {disk_path: packed}", "  prepacked: true", "teacher:",
                  "  kind: dataset",
                  f"  logprob_compressor: {{d: {vocab}, k: {meta.get('top_k', 'K')}, exact_k: {meta.get('top_k', 'K')}, "
                  "residual_bins: []}  # raw top-k: read as it is", "```"]
    return lines


WRITERS: dict[str, Callable[[Path, Path, bool], dict[str, int]]] = {
    "axolotl-kd": write_axolotl_kd, "distillkit": write_distillkit,
}
