"""Helpers the tests import: the repository's paths, the test key, prompt and recipe writers, a JSONL reader
and a tiny random Llama. The fixtures that use them are in tests/conftest.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-0123456789abcdef-SECRET"


def write_prompts(path: Path, count: int, *, prefix: str = "question") -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"p{i}", "prompt": f"{prefix} {i}", "attributes": {"k": i % 3}}) + "\n")
    return path


def write_recipe(path: Path, *, output_dir: Path, prompts: Path, provider: str, base_url: str,
                 model: str = "gpt-4o-mini", n: int = 1, extra_teacher: str = "", extra: str = "") -> Path:
    path.write_text(
        "factory:\n"
        f"  output_dir: {output_dir}\n"
        f"  prompts: {{path: {prompts}}}\n"
        f"  samples_per_prompt: {n}\n"
        "  teacher:\n"
        f"    provider: {provider}\n"
        f"    model: {model}\n"
        f"    base_url: {base_url}\n"
        "    api_key_env: APPRENTICE_TEST_KEY\n"
        "    params: {temperature: 0.8, max_tokens: 64}\n"
        f"{extra_teacher}"
        f"{extra}",
        encoding="utf-8",
    )
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


PYTHON = sys.executable


# ---- a tiny random Llama: 2 layers, a word-level tokenizer, a chat template that marks the assistant turn
WORDS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "answer"] + \
    list("abcdefghijklmnop") + list("ABCDEFGHIJKLMNOP")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tiny_llama(folder: Path, extra_words: tuple[str, ...] = (), seed: int = 0, *, hidden_size: int = 64,
                     layers: int = 2) -> Path:
    """A random Llama (2 layers of width 64 unless told) with a word-level tokenizer and a chat template, saved
    as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = WORDS + list(extra_words)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 3
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

