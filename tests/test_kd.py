"""Distillation: the loss against hand-computed values, the alignment rule, and training a tiny random Llama
with `sft.distill` from a sidecar written with its own tokenizer (plus the refusals)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_tiny_llama

from apprentice.errors import RecipeError
from sft.config import SFTConfig
from sft.kd import align, distill_loss


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def soften(p: list[float], temperature: float) -> list[float]:
    """p^(1/T), renormalised: a distribution at temperature T."""
    powered = [pi ** (1 / temperature) for pi in p]
    return [x / sum(powered) for x in powered]


def one_token(student: list[float], teacher: list[float], teacher_ids: list[int], label: int, **kwargs):
    """A batch of one sequence: a prompt token (masked), then one completion token `label`.

    The student's logits at the prompt position are log(student), so its distribution is `student`.
    """
    vocab = len(student)
    logits = torch.zeros(1, 2, vocab)
    logits[0, 0] = torch.log(torch.tensor(student))
    logits[0, 1] = torch.randn(vocab)  # predicts past the end: must not matter
    labels = torch.tensor([[-100, label]])
    ids = torch.full((1, 2, len(teacher_ids)), -1, dtype=torch.long)
    ids[0, 1] = torch.tensor(teacher_ids)
    logprobs = torch.full((1, 2, len(teacher_ids)), -torch.inf)
    logprobs[0, 1] = torch.log(torch.tensor(teacher))
    mask = torch.tensor([[False, True]])
    return distill_loss(logits, labels, ids, logprobs, mask, **kwargs)


# ---- the loss --------------------------------------------------------------------------------------------
P, Q = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]


def test_equals_the_kl_of_known_distributions():
    result = one_token(Q, P, [0, 1, 2], label=0, alpha=1.0, temperature=1.0)
    # 0.7·ln(0.7/0.5) + 0.2·ln(0.2/0.3) + 0.1·ln(0.1/0.2) = 0.2355 − 0.0811 − 0.0693
    assert result.loss.item() == pytest.approx(0.0851228, abs=1e-6)
    assert result.loss.item() == pytest.approx(kl(P, Q), abs=1e-6)
    same = one_token(P, P, [0, 1, 2], label=0, alpha=1.0, temperature=1.0)
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_softens_both_and_scales_by_t_squared():
    for temperature in (2.0, 4.0):
        result = one_token(Q, P, [0, 1, 2], label=0, alpha=1.0, temperature=temperature)
        expected = temperature ** 2 * kl(soften(P, temperature), soften(Q, temperature))
        assert result.loss.item() == pytest.approx(expected, rel=1e-5)
        assert result.kd == pytest.approx(expected, rel=1e-5) and result.kd_tokens == 1


def test_alpha_mixes_kl_and_cross_entropy():
    ce = -math.log(Q[1])  # the label is token 1
    plain = one_token(Q, P, [0, 1, 2], label=1, alpha=0.0, temperature=2.0)
    assert plain.loss.item() == pytest.approx(ce, rel=1e-6)
    half = one_token(Q, P, [0, 1, 2], label=1, alpha=0.5, temperature=1.0)
    assert half.loss.item() == pytest.approx(0.5 * kl(P, Q) + 0.5 * ce, rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_with_prompt_and_padding_masked():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 4, 7, 1, -100],     # prompt, prompt, completion ×3, padding
                           [-100, 2, 9, -100, -100, -100]])
    ids = torch.randint(0, 11, (2, 6, 3))
    logprobs = torch.log_softmax(torch.randn(2, 6, 3), dim=-1)
    mask = labels != -100
    result = distill_loss(logits, labels, ids, logprobs, mask, alpha=0.0, temperature=2.0)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6) and result.tokens == 5

    # Prompt and padding positions: whatever the logits and teacher hold there, the loss does not move.
    with_kd = distill_loss(logits, labels, ids, logprobs, mask, alpha=0.7, temperature=2.0)
    changed_logits, changed_lp = logits.detach().clone(), logprobs.clone()
    changed_logits[0, 0] += 5.0   # predicts the second prompt token
    changed_logits[0, 4:] += 5.0  # predicts padding / past the end
    changed_lp[:, 0] = torch.log_softmax(torch.randn(2, 3), dim=-1)
    everywhere = torch.ones_like(mask)  # a teacher "distribution" on prompt tokens too
    moved = distill_loss(changed_logits, labels, ids, changed_lp, everywhere, alpha=0.7, temperature=2.0)
    assert moved.loss.item() == pytest.approx(with_kd.loss.item(), rel=1e-6)
    with_kd.loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 4:].abs().sum() == 0


def test_top_k_teacher_is_renormalised_and_student_is_full_vocabulary():
    student = [0.4, 0.3, 0.2, 0.1]
    # The teacher kept its top 2 (0.5 + 0.3 = 0.8 of its mass): renormalised to 0.625 / 0.375.
    result = one_token(student, [0.5, 0.3], [0, 1], label=0, alpha=1.0, temperature=1.0)
    expected = 0.625 * math.log(0.625 / 0.4) + 0.375 * math.log(0.375 / 0.3)
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    # = KL to the student renormalised over the same two ids, plus −log of the student's mass on them.
    assert expected == pytest.approx(kl([0.625, 0.375], [0.4 / 0.7, 0.3 / 0.7]) - math.log(0.7), rel=1e-9)
    # A padded entry (id −1, logprob −inf: a server gave fewer than k) changes nothing, and stays finite.
    logits = torch.log(torch.tensor([[student, student]])).requires_grad_()
    labels = torch.tensor([[-100, 0]])
    ids = torch.tensor([[[0, 1, -1], [0, 1, -1]]])
    logprobs = torch.log(torch.tensor([[[0.5, 0.3, 0.0], [0.5, 0.3, 0.0]]]))
    padded = distill_loss(logits, labels, ids, logprobs, torch.tensor([[True, True]]), alpha=1.0, temperature=1.0)
    assert padded.loss.item() == pytest.approx(expected, rel=1e-6)
    padded.loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_tokens_without_teacher_fall_back_to_cross_entropy():
    without = one_token(Q, P, [0, 1, 2], label=2, alpha=1.0, temperature=2.0)
    logits = torch.zeros(1, 2, 3)
    logits[0, 0] = torch.log(torch.tensor(Q))
    no_mask = distill_loss(logits, torch.tensor([[-100, 2]]), torch.zeros(1, 2, 3, dtype=torch.long),
                           torch.zeros(1, 2, 3), torch.tensor([[False, False]]), alpha=1.0, temperature=2.0)
    assert no_mask.loss.item() == pytest.approx(-math.log(Q[2]), rel=1e-6) and no_mask.kd_tokens == 0
    assert without.kd_tokens == 1


def test_alignment_rule():
    assert align([5, 6, 3, 9], [5, 6, 3]) == 3      # the template's "\n" after the end of turn
    assert align([5, 6], [5, 6, 7, 3]) == 2         # the student's side cut by max_length
    assert align([5, 6, 3, 9], [5, 6, 0]) == 2      # the teacher stopped on another end token
    assert align([5, 8, 3], [5, 6, 3]) == 0         # tokenized differently: plain CE
    assert align([], [1]) == 0 and align([1], []) == 0


# ---- training --------------------------------------------------------------------------------------------
LETTERS = "abcdefghijklmnop"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-student"))
    from transformers import AutoTokenizer

    return folder, AutoTokenizer.from_pretrained(folder)


def write_distill_run(run: Path, tokenizer, name: str, *, count: int = 24, mismatched: str = "s1",
                      missing: str = "s2") -> Path:
    """A factory run ('x y' → 'X') and its sidecar, as the local teacher would write them with `tokenizer`:
    the sampled ids are the answer's token and the end of turn; the teacher puts 0.6 on the right letter.
    Record `mismatched` gets other sampled ids than its text; `missing` gets no logprobs at all."""
    from apprentice.tokens import TokenLogprobs
    from factory.logprobs import LogprobsWriter, tokenizer_fingerprint

    run.mkdir(parents=True)
    vocab = tokenizer.get_vocab()
    writer = LogprobsWriter(run, {"top_k": 4, "token_kind": "ids",
                                  "tokenizer": tokenizer_fingerprint(tokenizer, name)}, shard_records=10)
    with (run / "accepted.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(count):
            first, second = LETTERS[i % 16], LETTERS[(i * 7 + 3) % 16]
            answer = first.upper()
            record_id = f"s{i}"
            handle.write(json.dumps({
                "id": record_id, "prompt": [{"role": "system", "content": "answer"},
                                            {"role": "user", "content": f"{first} {second}"}],
                "completion": [{"role": "assistant", "content": answer}],
            }) + "\n")
            if record_id == missing:
                continue
            sampled = [vocab[answer if record_id != mismatched else LETTERS[(i + 1) % 16].upper()], vocab["<|im_end|>"]]
            others = [vocab[c.upper()] for c in LETTERS if c != first][:3]
            top_ids = np.array([[sampled[0]] + others, [vocab["<|im_end|>"]] + others], np.int32)
            top_lp = np.log(np.array([[0.6, 0.2, 0.1, 0.05]] * 2, np.float32))
            writer.write(record_id, TokenLogprobs(top_lp[:, 0].copy(), top_lp, np.array(sampled, np.int32), top_ids))
    writer.close()
    (run / "manifest.json").write_text(json.dumps({"fingerprint_hash": "fp-kd"}), encoding="utf-8")
    return run


def distill_config(student: Path, run: Path, out: Path, **extra) -> SFTConfig:
    section = {
        "student": str(student), "data": [str(run)], "output_dir": str(out), "held_out": 0.25, "seed": 0,
        "max_length": 32, "learning_rate": 1e-2, "per_device_batch_size": 6, "eval_every_steps": 2,
        "max_steps": 4, "logging_steps": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "distill": {"alpha": 0.5, "temperature": 2.0},
    }
    section.update(extra)
    return SFTConfig(**section)


def test_distill_config_needs_completion_only_loss_without_packing():
    SFTConfig(data=["x"], distill={})
    for bad in ({"packing": True}, {"completion_only_loss": False}):
        with pytest.raises(ValueError, match="distill needs packing: false and completion_only_loss: true"):
            SFTConfig(data=["x"], distill={}, **bad)


def test_a_run_without_logprobs_is_refused(tmp_path, tiny):
    from sft.train import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "accepted.jsonl").write_text(json.dumps({
        "id": "s0", "prompt": [{"role": "user", "content": "a b"}], "completion": [{"role": "assistant", "content": "A"}],
    }) + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"has none .*logprobs.* factory\.teacher\.logprobs: \{top_k: 20\}"):
        train(distill_config(tiny[0], run, tmp_path / "out", held_out=0))


def test_a_student_with_another_tokenizer_is_refused_naming_both(tmp_path, tiny):
    from factory.logprobs import tokenizer_fingerprint
    from sft.train import train

    folder, tokenizer = tiny
    run = write_distill_run(tmp_path / "run", tokenizer, "teacher-model")
    other = build_tiny_llama(tmp_path / "other", extra_words=("zebra",))
    from transformers import AutoTokenizer

    theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(other))["vocab_sha256"][:16]
    ours = tokenizer_fingerprint(tokenizer)["vocab_sha256"][:16]
    with pytest.raises(RecipeError) as info:
        train(distill_config(other, run, tmp_path / "out"))
    message = str(info.value)
    assert theirs in message and ours in message and "teacher-model" in message
    assert "Use a student with the teacher's tokenizer" in message and "remove sft.distill" in message


@pytest.mark.slow
def test_training_with_distill_uses_the_teacher_and_counts_fallbacks(tmp_path, tiny):
    from sft.data import load_splits
    from sft.train import train

    folder, tokenizer = tiny
    run = write_distill_run(tmp_path / "run", tokenizer, str(folder))
    config = distill_config(folder, run, tmp_path / "out")
    train_set, _, _ = load_splits(config.data, config.held_out, config.seed)
    expected_missing = int("s2" in train_set["id"])
    expected_mismatched = int("s1" in train_set["id"])

    result = train(config)
    info = result.distill
    assert info["samples"] == len(train_set) == 18
    assert (info["missing"], info["mismatched"]) == (expected_missing, expected_mismatched)
    assert info["aligned"] == 18 - expected_missing - expected_mismatched
    assert info["kd_tokens"] == 2 * info["aligned"]  # the answer and the end of turn; not the template's tail
    lineage = json.loads(result.lineage_path.read_text())
    state = result.output_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    kd = [entry["kd_loss"] for entry in history if "kd_loss" in entry]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd), history
    assert all(math.isfinite(entry["ce_loss"]) for entry in history if "ce_loss" in entry)
    assert "eval_loss" in lineage["metrics"] and lineage["distill"]["aligned"] == info["aligned"]
    assert (result.output_dir / "loss_curves.png").stat().st_size > 1000
    assert (result.output_dir / "merged" / "model.safetensors").is_file()


# The sweep's own tests (temperatures among them) are in tests/test_sweep.py.


def test_sweep_cli_refuses_bad_temperatures_and_a_recipe_without_distill(tmp_path, capsys):
    import yaml

    from sft.__main__ import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sft": {"data": [str(tmp_path / "run")], "output_dir": str(tmp_path / "o")}}))
    assert main(["sweep", str(recipe), "--temperatures", "1,hot"]) == 2
    assert "--temperatures '1,hot'" in capsys.readouterr().err
    assert main(["sweep", str(recipe), "--fraction", "0"]) == 2
    assert main(["sweep", str(recipe)]) == 2
    assert "add sft.distill" in capsys.readouterr().err
