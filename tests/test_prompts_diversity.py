"""Diversity sampling: per-sample sampling parameters drawn from ranges, prompts from a dataset, and
self-instruct expansion; runs go through the real openai SDK against the fake server."""
from __future__ import annotations

import itertools
import json
import re

import pytest
from helpers import read_jsonl, write_prompts, write_recipe
from pydantic import ValidationError

from apprentice.errors import RecipeError
from factory.__main__ import main
from factory.prompt_config import DatasetConfig, PromptsConfig, SelfInstructConfig, Similarity
from factory.prompt_dataset import DATASET_FILE, write_dataset
from factory.prompts import PromptError
from factory.recipe import FactoryConfig, ParamRanges, load_factory_config
from factory.self_instruct import _Index, parse_prompts


# ---- sampling parameters drawn from ranges ----------------------------------------------------------------
def test_param_range_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "factory:\n"
        "  prompts: {path: p.jsonl}\n"
        "  teacher:\n"
        "    provider: openai\n"
        "    param_ranges: {temperature: [1.1, 0.3], top_p: [0.0, 1.0], min_p: [0, 1], top_k: [0.5, 2]}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    assert "factory.teacher.param_ranges.temperature: Value error, [1.1, 0.3]: low must not exceed high" in text
    assert "factory.teacher.param_ranges.top_p: Value error, [0.0, 1.0]: values must lie in (0, 1]" in text
    assert "factory.teacher.param_ranges.min_p: unknown key" in text
    assert "factory.teacher.param_ranges.top_k" in text  # an integer range
    recipe.write_text(
        "factory:\n"
        "  prompts: {path: p.jsonl}\n"
        "  teacher: {provider: anthropic, param_ranges: {frequency_penalty: [0, 1]}}\n"
    )
    with pytest.raises(RecipeError, match=r"factory.teacher: .*param_ranges.frequency_penalty: provider anthropic"):
        load_factory_config(recipe)


def test_draws_are_seeded_by_prompt_and_sample_rounded_and_in_range():
    ranges = ParamRanges(temperature=(0.3, 1.1), top_p=(0.8, 1.0), top_k=(5, 50))
    first = ranges.draw("p1", 0)
    assert first == ranges.draw("p1", 0) == ParamRanges(**ranges.model_dump()).draw("p1", 0)
    draws = [ranges.draw(f"p{i}", s) for i in range(50) for s in range(2)]
    assert len({d["temperature"] for d in draws}) > 40
    for d in draws:
        assert 0.3 <= d["temperature"] <= 1.1 and 0.8 <= d["top_p"] <= 1.0 and isinstance(d["top_k"], int)
        assert d["temperature"] == round(d["temperature"], 3)


def test_param_ranges_enter_the_fingerprint_only_when_set():
    prompts = {"path": "p.jsonl"}
    plain = FactoryConfig(prompts=prompts)
    assert "param_ranges" not in plain.fingerprint()
    assert plain.fingerprint_hash() == "923547f39b9867c6"  # as before param_ranges existed
    ranged = FactoryConfig(prompts=prompts, teacher={"param_ranges": {"temperature": [0.3, 1.1]}})
    assert ranged.fingerprint()["param_ranges"] == {"temperature": [0.3, 1.1]}
    assert ranged.fingerprint_hash() != plain.fingerprint_hash()


def test_each_sample_sends_and_records_its_own_draw_and_resumes(tmp_path, server, env_key):
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", output_dir=run, prompts=write_prompts(tmp_path / "p.jsonl", 4), provider="openai",
        base_url=server.openai_base_url, n=3,
        extra_teacher="    param_ranges: {temperature: [0.3, 1.1], top_p: [0.8, 1.0]}\n",
    )
    assert main(["generate", str(recipe)]) == 0
    bodies = server.stats.snapshot()["bodies"]
    assert len(bodies) == 12 and all("n" not in body for body in bodies)  # one request per sample
    sent = {(body["messages"][-1]["content"], body["temperature"], body["top_p"]) for body in bodies}
    records = read_jsonl(run / "accepted.jsonl")
    assert len(records) == 12
    recorded = set()
    for record in records:
        params = record["teacher"]["params"]
        assert params["max_tokens"] == 64 and 0.3 <= params["temperature"] <= 1.1 and 0.8 <= params["top_p"] <= 1
        recorded.add((record["prompt"][-1]["content"], params["temperature"], params["top_p"]))
    assert recorded == sent and len({t for _, t, _ in sent}) > 6
    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0  # the same draws, the same bodies: all done already
    assert server.stats.total == 0
    (run / "accepted.jsonl").unlink()  # records gone: the cache must still know every drawn body
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 0 and len(read_jsonl(run / "accepted.jsonl")) == 12


# ---- prompts from a dataset --------------------------------------------------------------------------------
def dataset_recipe(path, run, server, dataset: str):
    path.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        f"  prompts: {{dataset: {dataset}}}\n"
        f"  teacher: {{provider: openai, model: gpt-4o-mini, base_url: '{server.openai_base_url}', "
        "api_key_env: APPRENTICE_TEST_KEY}\n"
    )
    return path


def test_a_dataset_run_takes_ids_attributes_and_references_and_resumes(tmp_path, server, env_key):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"uid": f"q{i}", "question": f"What is {i} + {i}?", "answer": 2 * i,
                                        "level": i % 2, "noise": "x"}) + "\n" for i in range(6)))
    run = tmp_path / "run"
    recipe = dataset_recipe(tmp_path / "r.yaml", run, server,
                            f"{{path: {rows}, column: question, id_column: uid, attribute_columns: [level], "
                            "reference_column: answer, limit: 4}")
    assert main(["generate", str(recipe)]) == 0
    lines = read_jsonl(run / DATASET_FILE)
    assert lines[0] == {"id": "q0", "prompt": "What is 0 + 0?", "attributes": {"level": 0}, "reference": "0"}
    records = read_jsonl(run / "accepted.jsonl")
    assert sorted(r["prompt_id"] for r in records) == ["q0", "q1", "q2", "q3"]
    assert all(r["attributes"] == {"level": int(r["prompt_id"][1:]) % 2} for r in records)
    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 0


def test_csv_parquet_and_saved_folders_with_messages(tmp_path):
    import datasets

    csv = tmp_path / "rows.csv"
    csv.write_text("text,topic\nhello there,greet\nname a color,art\n")
    lines = read_jsonl(write_dataset(DatasetConfig(path=str(csv), column="text", attribute_columns=["topic"]),
                                     tmp_path / "a"))
    assert lines == [{"id": "0", "prompt": "hello there", "attributes": {"topic": "greet"}},
                     {"id": "1", "prompt": "name a color", "attributes": {"topic": "art"}}]
    chats = {"messages": [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}],  # the dataset's own answer is left to the teacher
        [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"}],
    ]}
    table = datasets.Dataset.from_dict(chats)
    table.to_parquet(str(tmp_path / "chats.parquet"))
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "saved"))
    from_parquet = read_jsonl(write_dataset(DatasetConfig(path=str(tmp_path / "chats.parquet"),
                                                          messages_column="messages"), tmp_path / "b"))
    assert from_parquet[0]["prompt"] == chats["messages"][0][:2] and from_parquet[1]["prompt"] == chats["messages"][1]
    from_disk = read_jsonl(write_dataset(DatasetConfig(path=str(tmp_path / "saved"), split="test",
                                                       messages_column="messages"), tmp_path / "c"))
    assert from_disk == [{"id": "0", "prompt": chats["messages"][1]}]
    with pytest.raises(PromptError, match=r"factory.prompts.dataset.split: no split 'dev' .* \['test', 'train'\]"):
        write_dataset(DatasetConfig(path=str(tmp_path / "saved"), split="dev", messages_column="messages"), tmp_path)


def test_dataset_errors_name_the_key_and_the_fix(tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "", "answer": "b"}) + "\n")
    with pytest.raises(PromptError) as info:
        write_dataset(DatasetConfig(path=str(rows), column="prompt", attribute_columns=["topic"]), tmp_path)
    assert "factory.prompts.dataset.column: no column 'prompt'" in str(info.value)
    assert "factory.prompts.dataset.attribute_columns.0: no column 'topic'" in str(info.value)
    assert "columns: ['question', 'answer']" in str(info.value)
    with pytest.raises(PromptError, match=r"1 bad row\(s\).*\n  row 1: \"prompt\" is empty"):
        write_dataset(DatasetConfig(path=str(rows), column="question"), tmp_path)
    with pytest.raises(PromptError, match=r"factory.prompts.dataset.path: .*nope.jsonl not found"):
        write_dataset(DatasetConfig(path=str(tmp_path / "nope.jsonl"), column="q"), tmp_path)
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PromptError) as info:
        write_dataset(DatasetConfig(path="someone/some-dataset", column="q"), tmp_path)
    assert str(info.value).startswith("factory.prompts.dataset.path: could not load 'someone/some-dataset' from")
    assert "give a local file" in str(info.value)
    assert not (tmp_path / DATASET_FILE).exists()
    with pytest.raises(ValidationError, match="one source"):
        PromptsConfig(path="p.jsonl", dataset={"path": str(rows), "column": "question"})
    with pytest.raises(ValidationError, match="either column"):
        DatasetConfig(path=str(rows), column="question", messages_column="m")


# ---- self-instruct expansion -------------------------------------------------------------------------------
def test_answers_are_cut_into_prompts():
    assert parse_prompts("Here are 3 prompts:\n1. First one\n2) Second\n   goes on\n\n3. **Third**\n\nEnjoy!") == \
        ["First one", "Second\ngoes on", "Third"]
    assert parse_prompts("- **Prompt:** a\n* b\n• c\n(4) d\nPrompt 5: e\n### 6. f") == list("abcdef")
    assert parse_prompts("Sure! Here you go:\nWrite a limerick.\n\"Plan a trip.\"\n") == ["Write a limerick.", "Plan a trip."]
    assert parse_prompts("") == []


@pytest.mark.parametrize("method", ["rouge_l", "minhash"])
def test_similarity_finds_the_closest_prompt(method):
    index = _Index(Similarity(method=method))
    index.add("s1", "Write a short poem about the sea at night", index.prepare("Write a short poem about the sea at night"))
    index.add("s2", "How do vaccines train the immune system?", index.prepare("How do vaccines train the immune system?"))
    score, row = index.closest(index.prepare("Write a short poem about the sea at night, please"))
    assert index.labels[row][0] == "s1" and score > 0.7
    score, _ = index.closest(index.prepare("List three uses of copper in electronics"))
    assert score < 0.3
    assert index.prepare("!!!") is None


def test_self_instruct_config_errors(tmp_path, server, env_key, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "factory:\n"
        f"  output_dir: {tmp_path / 'run'}\n"
        f"  prompts: {{self_instruct: {{seeds: {tmp_path / 'seeds.jsonl'}, count: 3}}}}\n"
        f"  teacher: {{provider: openai, base_url: '{server.openai_base_url}', api_key_env: APPRENTICE_TEST_KEY}}\n"
    )
    assert main(["generate", str(recipe)]) == 2
    assert "factory.prompts.self_instruct.seeds: " in capsys.readouterr().err
    (tmp_path / "seeds.jsonl").write_text('{"prompt": ""}\n')
    assert main(["generate", str(recipe)]) == 2
    assert re.search(r"self_instruct.seeds: .*seeds.jsonl:1: \"prompt\" is empty", capsys.readouterr().err, re.DOTALL)
    assert server.stats.total == 0
    with pytest.raises(ValidationError, match="must contain {examples}"):
        SelfInstructConfig(seeds="s.jsonl", count=3, instruction="Write {n} prompts like {these}")
    with pytest.raises(ValidationError, match="one source"):
        PromptsConfig(path="p.jsonl", self_instruct={"seeds": "s.jsonl", "count": 3})
    with pytest.raises(ValidationError, match="similarity.max"):
        PromptsConfig(self_instruct={"seeds": "s.jsonl", "count": 3, "similarity": {"max": 1.5}})


SEEDS = ["Write a haiku about autumn leaves.", "Explain how a refrigerator works.",
         "Give me three tips for a job interview.", "What causes the seasons on Earth?"]


def expansion_responder():
    fresh = itertools.count()

    def respond(messages, index, body):
        text = messages[-1]["content"]
        if "new prompts" not in text:
            return f"Answer: {text}"
        shown = re.findall(r"^\d+\. (.*)$", text, re.MULTILINE)
        k = next(fresh)
        words = [f"w{k}x{j}" for j in range(6)]
        return (
            "Here are some new prompts:\n"
            f"1. {shown[0]} Please.\n"                                       # a seed, reworded: too similar
            f"2) Describe {words[0]} {words[1]} {words[2]}.\n"
            f"3) Describe {words[0]} {words[1]} {words[2]}.\n"               # the one before, again
            f"- **Prompt:** Compare {words[3]} with {words[4]}\n  across {words[5]} seasons.\n"
            "\nI hope these help!"
        )

    return respond


def test_self_instruct_expands_drops_near_duplicates_and_resumes(tmp_path, server, env_key, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"seed{i}", "prompt": p}) + "\n" for i, p in enumerate(SEEDS)))
    server.config.responder = expansion_responder()
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "factory:\n"
        f"  output_dir: {run}\n"
        f"  prompts: {{self_instruct: {{seeds: {seeds}, count: 5, per_request: 3}}}}\n"
        f"  teacher: {{provider: openai, model: gpt-4o-mini, base_url: '{server.openai_base_url}', "
        "api_key_env: APPRENTICE_TEST_KEY, params: {max_tokens: 256}}\n"
    )
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 3 + 5  # three rounds of two new prompts each, then one answer per prompt
    prompts = read_jsonl(run / "prompts.self_instruct.jsonl")
    assert [p["id"] for p in prompts] == [f"si-{i:06d}" for i in range(1, 6)]
    assert all(p["attributes"] == {"source": "self_instruct"} for p in prompts)
    assert re.fullmatch(r"Compare w(\d)x3 with w\1x4\nacross w\1x5 seasons\.", prompts[1]["prompt"])  # two lines
    rejected = read_jsonl(run / "prompts.self_instruct.rejected.jsonl")
    assert [r["rejected_by"] for r in rejected] == ["similar"] * 5
    to_seed, to_new = rejected[0], rejected[1]
    assert to_seed["similar_id"].startswith("seed") and to_seed["prompt"] == to_seed["similar_prompt"] + " Please."
    assert to_seed["reason"].startswith(f"too similar to {to_seed['similar_id']} (rouge_l 0.9")
    assert to_new["similar_id"] == "si-000001" and to_new["score"] == 1.0
    records = read_jsonl(run / "accepted.jsonl")
    assert sorted(r["prompt_id"] for r in records) == [p["id"] for p in prompts]
    assert all(r["attributes"] == {"source": "self_instruct"} for r in records)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["self_instruct"]["prompts"] == 5 and manifest["self_instruct"]["requests"] == 3
    assert "self-instruct: 5 new prompts in 3 round(s), 5 dropped" in capsys.readouterr().err

    server.reset_stats()
    assert main(["generate", str(recipe)]) == 0  # the finished expansion is reused: nothing to send
    assert server.stats.total == 0
    assert "(reused)" in capsys.readouterr().err

    # A run stopped half-way: the prompts come back from the cache, the same, for nothing.
    (run / "prompts.self_instruct.state.json").unlink()
    (run / "prompts.self_instruct.jsonl").write_text(json.dumps(prompts[0]) + "\n")
    assert main(["generate", str(recipe)]) == 0
    assert server.stats.total == 0 and read_jsonl(run / "prompts.self_instruct.jsonl") == prompts

    # More prompts wanted: the rounds answered before are replayed, then it goes on.
    assert main(["generate", str(recipe), "--set", "factory.prompts.self_instruct.count=7"]) == 0
    more = read_jsonl(run / "prompts.self_instruct.jsonl")
    assert more[:5] == prompts and len(more) == 7
    assert server.stats.total == 1 + 2  # one new round, and the answers to the two new prompts
