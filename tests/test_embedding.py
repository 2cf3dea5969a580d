"""Embeddings that honour the model: tiny random BERTs saved as sentence-transformers folders, each saying how it
pools (CLS, mean, …), whether it normalises, its max_seq_length and its document prompt; semantic_dup embeds
every answer as its folder says. No hub, no wheel: the models are built here in a second."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apprentice.errors import RecipeError
from factory.recipe import load_factory_config
from factory.records import Sample
from quality_checks import CheckConfigError, build_checks
from quality_checks.embedding import SentenceConfig, read_sentence_config

torch = pytest.importorskip("torch")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "passage", "query", ":", "the", "cat", "sat", "on", "mat",
         "a", "dog", "ran", "far", "away", "##s"]
TEXTS = ["the cat sat on the mat", "a dog ran far away", "the dogs sat", "cat"]  # lengths differ: padding


def build_tiny_bert(folder: Path, pooling: dict, *, normalize: bool = True, transformer: str = "",
                    prompts: dict | None = None, max_seq_length: int = 16) -> Path:
    """A 2-layer random BERT with a WordPiece tokenizer, saved with the sentence-transformers files that say how to
    pool it: modules.json, 1_Pooling/config.json, sentence_bert_config.json, config_sentence_transformers.json."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(folder / transformer)
    BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)}).save_pretrained(folder / transformer)
    modules = [{"idx": 0, "name": "0", "path": transformer, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (folder / transformer / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    if prompts is not None:
        (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return folder


def token_vectors(folder: Path, texts: list[str], transformer: str = "",
                  max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's last hidden states and attention mask, computed here without the check."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / transformer)
    model = AutoModel.from_pretrained(folder / transformer).eval()
    batch = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                      return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).last_hidden_state, batch["attention_mask"]


def semantic_dup(folder: Path, **options):
    return build_checks([{"name": "semantic_dup", "model": str(folder), "device": "cpu", **options}])[0]


def sample(text: str, id: str) -> Sample:
    return Sample(id=id, prompt=[{"role": "user", "content": "q"}], completion=[{"role": "assistant", "content": text}],
                  teacher={})


def test_a_cls_pooled_model_is_embedded_by_its_normalised_cls_vector_not_the_mean(tmp_path):
    folder = build_tiny_bert(tmp_path / "cls", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    embedded = semantic_dup(folder).embed(TEXTS)
    hidden, mask = token_vectors(folder, TEXTS)
    cls = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    weights = mask.unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1).numpy()
    assert np.abs(embedded - cls).max() < 1e-5, "the embedding is the [CLS] vector, normalised"
    assert np.abs(embedded - mean).max() > 0.1, "mean pooling gives other vectors"


def test_a_model_without_normalize_keeps_its_norm_and_the_check_still_compares_cosines(tmp_path):
    folder = build_tiny_bert(tmp_path / "raw", {"pooling_mode": "cls"}, normalize=False, transformer="0_Transformer")
    check = semantic_dup(folder)
    hidden, _ = token_vectors(folder, TEXTS, "0_Transformer")
    embedded = check.embed(TEXTS)
    assert np.abs(embedded - hidden[:, 0].numpy()).max() < 1e-5, "no Normalize module: the raw [CLS] vector"
    assert np.linalg.norm(embedded[0]) > 1.5, "a random BERT's [CLS] is far from unit length"
    first = sample(TEXTS[0], "first")
    assert check(first).passed
    check.remember(first)
    verdict = check(sample(TEXTS[0], "again"))
    assert not verdict.passed and verdict.score == pytest.approx(1.0, abs=1e-4), verdict


def test_mean_max_and_lasttoken_pooling_and_max_seq_length_follow_the_config(tmp_path):
    for mode in ("mean", "max", "lasttoken"):
        folder = build_tiny_bert(tmp_path / mode, {"pooling_mode": mode}, normalize=False, max_seq_length=4)
        hidden, attention = token_vectors(folder, TEXTS, max_length=4)
        assert hidden.shape[1] == 4, "the longest text is cut at max_seq_length"
        mask = attention.unsqueeze(-1).float()
        last = attention.sum(1) - 1
        expected = {"mean": (hidden * mask).sum(1) / mask.sum(1),
                    "max": hidden.masked_fill(mask == 0, float("-inf")).max(1).values,
                    "lasttoken": hidden[torch.arange(len(TEXTS)), last]}[mode]
        assert np.abs(semantic_dup(folder).embed(TEXTS) - expected.numpy()).max() < 1e-5, mode


def test_the_document_prompt_comes_from_the_model_config_and_prefix_overrides_it(tmp_path):
    folder = build_tiny_bert(tmp_path / "e5", {"pooling_mode_mean_tokens": True},
                             prompts={"query": "query: ", "passage": "passage: "})
    assert read_sentence_config(str(folder)).prompt == "passage: "  # documents, as encode_document picks
    own = semantic_dup(folder).embed(["the cat sat"])
    bare = semantic_dup(folder, prefix="")
    assert np.abs(own - bare.embed(["passage: the cat sat"])).max() < 1e-6, "the model's prompt goes first"
    assert np.abs(own - bare.embed(["the cat sat"])).max() > 1e-3, "and it changes the vector"
    query = semantic_dup(folder, prefix="query: ").embed(["the cat sat"])
    assert np.abs(query - bare.embed(["query: the cat sat"])).max() < 1e-6, "prefix: replaces the model's prompt"


def test_a_model_that_pools_without_its_prompt_leaves_the_prompt_tokens_out(tmp_path):
    folder = build_tiny_bert(tmp_path / "instructor", {"pooling_mode": "mean", "include_prompt": False},
                             normalize=False)
    embedded = semantic_dup(folder, prefix="passage: ").embed(["the cat sat", "dog"])
    hidden, mask = token_vectors(folder, ["passage: the cat sat", "passage: dog"])
    mask[:, :3] = 0  # [CLS] passage :
    weights = mask.unsqueeze(-1).float()
    assert np.abs(embedded - ((hidden * weights).sum(1) / weights.sum(1)).numpy()).max() < 1e-5


def test_options_and_configs_the_check_cannot_honour_are_refused_with_their_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("factory:\n  prompts: {path: p.jsonl}\n  checks: [{name: semantic_dup, prefix: 3}]\n")
    with pytest.raises(RecipeError, match=r"factory\.checks\.0\.prefix"):
        load_factory_config(path)
    path.write_text("factory:\n  prompts: {path: p.jsonl}\n  checks: [{name: semantic_dup, prefix: 'passage: '}]\n")
    assert load_factory_config(path).fingerprint()["checks"] == [{"name": "semantic_dup", "prefix": "passage: "}]

    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(CheckConfigError, match=r"has a sentence_transformers\.models\.Dense module"):
        read_sentence_config(str(folder))
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.0\.model: embedding model .* has a .*Dense module"):
        build_checks([{"name": "semantic_dup", "model": str(folder)}])
    (folder / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
    with pytest.raises(CheckConfigError, match="unknown pooling mode 'median'"):
        read_sentence_config(str(folder))
    assert read_sentence_config(str(tmp_path)) == SentenceConfig(), "a plain transformers folder: mean pooling"


@pytest.mark.slow
def test_the_same_vectors_as_sentence_transformers_for_every_pooling_mode(tmp_path):
    """sentence-transformers is the reference: same pooling, prompt handling, truncation and normalisation."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    cases = [({"pooling_mode_cls_token": True}, True, None), ({"pooling_mode": "max"}, False, None),
             ({"pooling_mode": "weightedmean"}, False, None), ({"pooling_mode": "lasttoken"}, True, None),
             ({"pooling_mode": ["cls", "mean"]}, False, None),
             ({"pooling_mode": "mean", "include_prompt": False}, True, {"passage": "passage: "}),
             ({"pooling_mode": "mean_sqrt_len_tokens"}, False, {"document": "passage: "})]
    texts = TEXTS + [" ".join(["the cat sat on the mat"] * 5)]  # longer than max_seq_length 16
    for i, (pooling, normalize, prompts) in enumerate(cases):
        folder = build_tiny_bert(tmp_path / str(i), pooling, normalize=normalize, prompts=prompts)
        model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
        # the prompt given by hand: sentence-transformers 6.3's encode_document takes its own empty "document"
        # placeholder before a model's "passage" prompt, and so would embed an E5 port without it
        reference = model.encode(texts, prompt=read_sentence_config(str(folder)).prompt or None)
        assert np.abs(semantic_dup(folder).embed(texts) - reference).max() < 1e-5, pooling
