"""KD exports: a run with a logprob sidecar as Axolotl's KD rows and DistillKit's offline rows, read back with
`datasets` and compared with the sidecar id for id; runs without usable ids are refused with the fix."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import build_tiny_llama

import apprentice_cli
from apprentice.tokens import TokenLogprobs
from factory.export import ExportError, export_run
from factory.logprobs import LogprobsWriter, read_logprobs, tokenizer_fingerprint

LETTERS = "abcdefgh"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-teacher"))
    return folder, AutoTokenizer.from_pretrained(folder)


def write_kd_run(run: Path, tokenizer, name: str) -> Path:
    """Six samples 'x y' → 'X' with a k=3 sidecar as a local teacher writes it. s1's sampled ids are NOT its
    text's (a re-encoding would give other ids); s2 has no logprobs; s3's second row has one padded slot."""
    run.mkdir(parents=True)
    vocab = tokenizer.get_vocab()
    end = vocab["<|im_end|>"]
    writer = LogprobsWriter(run, {"top_k": 3, "token_kind": "ids", "provider": "local", "model": name,
                                  "tokenizer": tokenizer_fingerprint(tokenizer, name)}, shard_records=4)
    with (run / "accepted.jsonl").open("w", encoding="utf-8") as handle:
        for i, letter in enumerate(LETTERS[:6]):
            record_id = f"s{i}"
            handle.write(json.dumps({
                "id": record_id, "prompt": [{"role": "system", "content": "answer"},
                                            {"role": "user", "content": f"{letter} b"}],
                "completion": [{"role": "assistant", "content": letter.upper()}],
                "teacher": {"provider": "local", "model": name},
            }) + "\n")
            if record_id == "s2":
                continue
            said = vocab[(LETTERS[i + 1] if record_id == "s1" else letter).upper()]
            others = [vocab[c.upper()] for c in LETTERS if vocab[c.upper()] != said][:2]
            top_ids = np.array([[said] + others, [end] + others], np.int32)
            top_lp = np.log(np.array([[0.7, 0.2, 0.1], [0.9, 0.05, 0.05]], np.float32))
            if record_id == "s3":
                top_ids[1, 2], top_lp[1, 2] = -1, -np.inf
            writer.write(record_id, TokenLogprobs(top_lp[:, 0].copy(), top_lp, np.array([said, end], np.int32), top_ids))
    writer.close()
    (run / "manifest.json").write_text(json.dumps({"fingerprint_hash": "fp-kd", "recipe": {
        "teacher": {"provider": "local", "model": name}, "prompts": {"path": "p.jsonl"}}}), encoding="utf-8")
    return run


@pytest.fixture
def run(tmp_path, tiny):
    folder, tokenizer = tiny
    return write_kd_run(tmp_path / "run", tokenizer, str(folder))


def test_axolotl_kd_rows_carry_the_sidecars_ids_per_completion_token(run, tmp_path, capsys):
    import datasets

    out = tmp_path / "out"
    assert apprentice_cli.main(["export", str(run), "--format", "axolotl-kd", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "exported 5 accepted sample(s) as axolotl-kd" in err and "left out 1 sample(s) without" in err, err
    data = datasets.load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
    assert set(data.column_names) == {"messages", "target_token_ids", "logprobs"}
    sidecar = read_logprobs(run)
    rows = {row["messages"][1]["content"][0]: row for row in data}
    assert "c" not in rows, "s2, without logprobs, is left out"
    for i, letter in enumerate(LETTERS[:6]):
        if i == 2:
            continue
        row, lp = rows[letter], sidecar[f"s{i}"]
        width = 2 if i == 3 else 3  # s3's padded slot cuts that sample to two alternatives
        assert row["target_token_ids"] == lp.top_ids[:, :width].tolist(), f"s{i}: the sidecar's ids, unchanged"
        assert np.allclose(row["logprobs"], lp.top_logprobs[:, :width]), f"s{i}"
        assert row["messages"][-1] == {"role": "assistant", "content": letter.upper()}
    vocab_b = rows["b"]["target_token_ids"][0][0]
    assert vocab_b != rows["a"]["target_token_ids"][0][0] and vocab_b == sidecar["s1"].sampled_ids[0], \
        "s1 keeps the teacher's sampled id, not its text re-encoded"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Teacher logprobs" in card and "type: axolotl.integrations.kd.chat_template" in card


def test_axolotl_rows_line_up_with_the_last_tokens_of_the_conversation(run, tmp_path, tiny):
    """Axolotl's v2 strategy puts the rows on the last tokens of the tokenized conversation: with this chat
    template they are exactly the teacher's sampled ids (the answer and the end of turn)."""
    _, tokenizer = tiny
    export_run(run, "axolotl-kd", tmp_path / "out")
    row = json.loads((tmp_path / "out" / "data.jsonl").read_text(encoding="utf-8").splitlines()[0])
    ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert [r[0] for r in row["target_token_ids"]] == list(ids[-len(row["target_token_ids"]):])


def test_distillkit_rows_predict_the_next_token_and_mask_the_prompt(run, tmp_path, tiny):
    import datasets

    _, tokenizer = tiny
    result = export_run(run, "distillkit", tmp_path / "out")
    assert result.samples == 5 and result.without_logprobs == 1 and result.data.name == "data.parquet"
    data = datasets.load_dataset("parquet", data_files=str(result.data), split="train")
    assert set(data.column_names) == {"input_ids", "labels", "token_ids", "top_values"}
    sidecar = read_logprobs(run)
    first = data[0]
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "answer"}, {"role": "user", "content": "a b"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    n = len(prompt)
    assert first["input_ids"] == list(prompt) + sidecar["s0"].sampled_ids.tolist()
    assert first["labels"] == [-100] * n + sidecar["s0"].sampled_ids.tolist()
    assert len(first["token_ids"]) == len(first["top_values"]) == len(first["input_ids"]) - 1
    for j in range(len(first["input_ids"]) - 1):  # position j holds the distribution over token j + 1
        assert first["token_ids"][j][0] == first["input_ids"][j + 1], j
    assert first["token_ids"][n - 1:] == sidecar["s0"].top_ids.tolist(), "completion rows are the sidecar's"
    assert np.allclose(first["top_values"][n - 1:], sidecar["s0"].top_logprobs)
    assert first["top_values"][0] == [0.0, -math.inf, -math.inf], "prompt positions: the next token, masked"
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert f"logprob_compressor: {{d: {len(tokenizer.get_vocab())}, k: 3, exact_k: 3" in card and "prepacked: true" in card
    padded = data[2]  # s3: the padded slot stays, as id 0 at -inf
    assert padded["token_ids"][-1][2] == 0 and padded["top_values"][-1][2] == -math.inf


@pytest.mark.parametrize("fmt", ["axolotl-kd", "distillkit"])
def test_a_run_without_a_sidecar_is_refused_naming_the_fix(tmp_path, capsys, fmt):
    from test_export import write_run

    run = write_run(tmp_path / "run")
    out = tmp_path / "out"
    assert apprentice_cli.main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no logprobs sidecar" in err and "factory.teacher.logprobs: {top_k: 20, token_ids: true}" in err, err
    assert len(err.strip().splitlines()) == 1 and list(out.iterdir()) == [], "nothing is left behind"


def test_token_strings_and_another_tokenizer_are_refused(tmp_path, tiny):
    folder, tokenizer = tiny
    strings = write_kd_run(tmp_path / "strings", tokenizer, str(folder))
    meta = json.loads((strings / "logprobs" / "meta.json").read_text())
    meta.update(token_kind="strings", note="hosted OpenAI returns token strings only")  # as a hosted teacher's
    (strings / "logprobs" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="token strings without ids"):
        export_run(strings, "axolotl-kd", tmp_path / "o1")
    other = build_tiny_llama(tmp_path / "other", extra_words=("zebra",))
    renamed = write_kd_run(tmp_path / "renamed", tokenizer, str(other))  # the sidecar's fingerprint is tiny's
    with pytest.raises(ExportError, match="not the one the teacher used"):
        export_run(renamed, "distillkit", tmp_path / "o2")


def test_a_local_teachers_run_exports_its_own_ids(tmp_path, tiny):
    """A real run of the local teacher with logprobs: the distillkit rows hold the very context it was asked
    with and the ids it sampled; the axolotl rows its top-k, row for row."""
    import datasets
    from test_logprobs import local_recipe

    from factory.__main__ import main as factory_main
    from factory.hf import encode_chat

    folder, tokenizer = tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q}) + "\n" for i, q in enumerate(["a b", "c d"])))
    run = tmp_path / "run"
    assert factory_main(["generate", str(local_recipe(tmp_path / "r.yaml", run, prompts, folder, temperature=0.9,
                                                      max_tokens=5, top_k=3))]) == 0
    sidecar = read_logprobs(run)
    records = [json.loads(line) for line in (run / "accepted.jsonl").read_text().splitlines()]
    kit = datasets.load_dataset("parquet", data_files=str(export_run(run, "distillkit", tmp_path / "dk").data),
                                split="train")
    assert len(kit) == len(records) == 2
    for record, row in zip(records, kit):
        assert row["input_ids"] == encode_chat(tokenizer, record["prompt"]) + sidecar[record["id"]].sampled_ids.tolist()
    result = export_run(run, "axolotl-kd", tmp_path / "ax")
    cut = sum(r["finish_reason"] == "length" for r in records)
    assert result.cut_off == cut and result.samples == len(records) - cut, "a random tiny teacher rarely stops"


def test_a_sample_the_teacher_did_not_finish_is_left_out_of_axolotl_kd(run, tmp_path, capsys):
    lines = (run / "accepted.jsonl").read_text().splitlines()
    cut = json.loads(lines[0]) | {"finish_reason": "length"}
    (run / "accepted.jsonl").write_text("\n".join([json.dumps(cut), *lines[1:]]) + "\n")
    assert apprentice_cli.main(["export", str(run), "--format", "axolotl-kd", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "exported 4 accepted" in err and "left out 1 sample(s) the teacher did not finish" in err, err
