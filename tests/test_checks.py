"""Quality checks: each check on hand-made Samples, check options in the recipe, and a run through the
real openai SDK against the fake server where every check fires a known number of times."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import read_jsonl, write_recipe

from apprentice.errors import RecipeError
from factory.__main__ import main
from factory.recipe import load_factory_config
from factory.records import Sample
from quality_checks import CheckConfigError, Verdict, build_checks, prime


def sample(text: str, *, id: str = "s0", prompt: str = "a question", finish: str = "stop",
           reference: str | None = None) -> Sample:
    return Sample(id=id, prompt=[{"role": "user", "content": prompt}],
                  completion=[{"role": "assistant", "content": text}], teacher={}, finish_reason=finish,
                  reference=reference)


def one(spec) -> object:
    return build_checks([spec])[0]


def test_empty_truncated_refusal():
    assert not one("empty")(sample("  \n")).passed
    assert one("empty")(sample("hi")).passed
    assert one("truncated")(sample("cut", finish="length")).reason.startswith("hit max_tokens")
    assert one("truncated")(sample("whole")).passed
    verdict = one("refusal")(sample("I'm sorry, but I can't help with that."))
    assert not verdict.passed and verdict.reason.startswith("refusal")
    assert one("refusal")(sample("Paris is the capital of France.")).passed


def test_length_counts_characters_and_whitespace_words():
    check = one({"name": "length", "min_chars": 5, "max_chars": 40, "min_tokens": 2, "max_tokens": 5})
    assert check(sample("three short words")).passed
    assert check(sample("tiny")).reason == "too short: 4 chars < min_chars 5"
    assert check(sample("x" * 41)).reason == "too long: 41 chars > max_chars 40"
    assert check(sample("onewordonly")).reason == "too short: 1 words < min_tokens 2"
    assert check(sample("a b c d e f")).reason == "too long: 6 words > max_tokens 5"


def test_regex_modes():
    must = one({"name": "regex", "pattern": r"\d+"})
    assert must(sample("42 apples")).passed
    assert must(sample("no digits")).reason == r"does not match /\d+/"
    never = one({"name": "regex", "pattern": r"(?i)https?://", "mode": "must_not_match"})
    assert never(sample("plain")).passed
    assert never(sample("see HTTP://x.org")).reason == "matches /(?i)https?:///: 'HTTP://'"


def test_json_parses_plain_and_fenced_and_names_the_failing_path(tmp_path):
    plain = one("json")
    assert plain(sample('{"a": 1}')).passed
    assert plain(sample('Here it is:\n```json\n{"a": [1, 2]}\n```\nDone.')).passed
    assert plain(sample("{'a': 1}")).reason.startswith("not JSON: Expecting property name")
    schema = {"type": "object", "required": ["items"],
              "properties": {"items": {"type": "array", "items": {"type": "object",
                                                                   "properties": {"price": {"type": "number"}}}}}}
    inline = one({"name": "json", "schema": schema})
    assert inline(sample('{"items": [{"price": 3.5}]}')).passed
    assert inline(sample('{"items": [{"price": "cheap"}]}')).reason == "schema: $.items[0].price: 'cheap' is not of type 'number'"
    assert inline(sample("{}")).reason == "schema: $: 'items' is a required property"
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    assert one({"name": "json", "schema": str(path)})(sample('{"items": 1}')).reason.startswith("schema: $.items:")
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.0\.schema: schema file .* not found"):
        build_checks([{"name": "json", "schema": str(tmp_path / "missing.json")}])
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.0\.schema: not a valid JSON Schema"):
        build_checks([{"name": "json", "schema": {"type": "no-such-type"}}])


def test_exact_dup_normalizes_and_only_remembers_accepted_samples():
    check = one("exact_dup")
    first = sample("Paris is the capital!", id="a1")
    assert check(first).passed
    # not remembered (a later check rejected it): the same text again still passes
    assert check(sample("paris is the  capital", id="a2")).passed
    check.remember(first)
    verdict = check(sample("  PARIS, is the capital.", id="a3"))
    assert not verdict.passed and verdict.reason == "exact duplicate of a1"
    assert check(sample("Paris is a capital", id="a4")).passed


LONG = ("the committee met on tuesday to review the budget for the new library and agreed that the reading "
        "room needs more light more seats and a quieter heating system before the winter term begins next year")


def test_near_dup_finds_the_accepted_sample_it_duplicates():
    check = one({"name": "near_dup", "threshold": 0.8})
    original = sample(LONG, id="orig")
    assert check(original).passed
    check.remember(original)
    near = sample(LONG.replace("next year", "next autumn"), id="near")
    verdict = check(near)
    assert not verdict.passed and verdict.reason.startswith("near-duplicate of orig (Jaccard ~0.9")
    assert 0.8 <= verdict.score < 1
    assert check(sample("an entirely different answer about rivers mountains and the sea in spring", id="x")).passed
    assert check(sample("", id="empty")).passed  # nothing to compare; `empty` is the check for that


def test_minhash_signatures_match_datasketch():
    from datasketch import MinHash

    from apprentice.text import fold_text
    from quality_checks.minhash import MinHasher, text_shingles, word_hashes

    hasher = MinHasher(num_perm=64, shingle=3)
    reference = MinHash(num_perm=64, permutations=hasher.permutations, scheme="affine32", hashfunc=int)
    reference.update_batch([int(h) for h in text_shingles(LONG, 3)])
    assert (reference.hashvalues == hasher.signature(LONG)).all()
    # equal words hash equally wherever they stand; different words differently
    tokens = fold_text(LONG + " Budget, THE library!").split()
    hashes = word_hashes(" ".join(tokens)).tolist()
    assert len(hashes) == len(tokens)
    assert {w: {h for t, h in zip(tokens, hashes) if t == w} for w in tokens} == {w: {hashes[tokens.index(w)]} for w in tokens}
    assert len(set(hashes)) == len(set(tokens))
    assert len(text_shingles("one two", 3)) == 1 and len(text_shingles("", 3)) == 0


def test_contamination_against_golden_prompts(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    (golden / "capitals.jsonl").write_text(
        json.dumps({"id": "g1", "prompt": "What is the capital of France?", "reference": "Paris"}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Name the largest ocean on Earth."}]}) + "\n")
    check = one({"name": "contamination", "path": str(golden)})
    verdict = check(sample("Paris", prompt="what is the capital of france"))
    assert not verdict.passed and verdict.reason == "prompt near golden capitals.jsonl#g1 (Jaccard ~1.00)"
    assert check(sample("x", prompt="Name the largest ocean on Earth!")).reason.startswith(
        "prompt near golden capitals.jsonl:2")
    assert check(sample("Rome", prompt="What is the capital of Italy and why?")).passed
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.0\.path: no golden set at"):
        build_checks([{"name": "contamination", "path": str(tmp_path / "nowhere")}])


def test_verifier_function_results_and_import_errors(tmp_path, monkeypatch):
    (tmp_path / "apprentice_verifiers.py").write_text(
        "from quality_checks import Verdict\n"
        "def has_x(sample, letter='x'):\n    return letter in sample.text\n"
        "def verdict(sample):\n    return Verdict(False, 'too polite', 0.2)\n"
        "def boom(sample):\n    raise RuntimeError('solver crashed')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    has_x = one({"name": "verifier", "function": "apprentice_verifiers:has_x"})
    assert has_x(sample("xyz")).passed
    assert has_x(sample("abc")).reason == "verifier returned False"
    assert one({"name": "verifier", "function": "apprentice_verifiers:has_x", "args": {"letter": "a"}})(sample("abc")).passed
    assert one({"name": "verifier", "function": "apprentice_verifiers:verdict"})(sample("a")) == Verdict(False, "too polite", 0.2)
    assert one({"name": "verifier", "function": "apprentice_verifiers:boom"})(sample("a")).reason == (
        "verifier raised RuntimeError: solver crashed")
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.1\.function: cannot import module 'no_such_mod'"):
        build_checks(["empty", {"name": "verifier", "function": "no_such_mod:f"}])
    with pytest.raises(CheckConfigError, match=r"factory\.checks\.0\.function: module 'apprentice_verifiers' has no attribute"):
        build_checks([{"name": "verifier", "function": "apprentice_verifiers:nope"}])


@pytest.mark.parametrize("mode, answer, passed", [
    ("exact", " Paris ", True), ("exact", "paris", False),
    ("normalized", "PARIS!", True), ("normalized", "It is Paris", False),
    ("contains", "I think it is Paris, France.", True), ("contains", "Parisian", False),
    ("number", "3 + 39 = 42.", True), ("number", "42, no wait, 41", False), ("number", "no idea", False),
    ("json", '{"city": "Paris", "n": 1}', True), ("json", '```json\n{"n":1,"city":"Paris"}\n```', True),
    ("json", '{"city": "paris", "n": 1}', False), ("json", "Paris", False),
])
def test_reference_modes(mode, answer, passed):
    reference = {"number": "42", "json": '{"n": 1, "city": "Paris"}'}.get(mode, "Paris")
    assert one({"name": "reference", "mode": mode})(sample(answer, reference=reference)).passed is passed


def test_reference_missing_and_number_formats():
    assert one("reference")(sample("x")).reason.startswith("no reference on the prompt line")
    assert one({"name": "reference", "missing": "pass"})(sample("x")).passed
    number = one({"name": "reference", "mode": "number"})
    assert number(sample("It costs $1,234.50 in total", reference="1234.5")).passed
    assert number(sample("The answer is 41.", reference="42")).reason == "number 41 != reference 42"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_check_config_is_reported_at_once_with_key_paths(tmp_path):
    recipe = write(tmp_path / "r.yaml", (
        "factory:\n  prompts: {path: p.jsonl}\n  checks:\n"
        "    - empty\n"
        "    - regex\n"
        '    - {name: regex, pattern: "(", mode: sometimes}\n'
        "    - {name: length, min_chars: ten, colour: red}\n"
        "    - {name: spellcheck}\n"
        "    - {name: near_dup, threshold: 1.5}\n"
        "    - {name: verifier, function: not-a-path}\n"
        "    - {name: length, min_chars: 9, max_chars: 3}\n"
    ))
    with pytest.raises(RecipeError) as info:
        load_factory_config(recipe)
    text = str(info.value)
    for expected in (
        "factory.checks.1: Value error, check 'regex' needs options (pattern)",
        "factory.checks.2.pattern: Value error, not a valid regular expression",
        "factory.checks.2.mode:",
        "factory.checks.3.min_chars:",
        "factory.checks.3.colour: unknown key",
        "factory.checks.4: Value error, unknown check 'spellcheck'; available: contamination, empty, exact_dup",
        "factory.checks.5.threshold:",
        "factory.checks.6.function:",
        "factory.checks.7: Value error, min_chars (9) is larger than max_chars (3)",
    ):
        assert expected in text, text
    twice = write(tmp_path / "t.yaml", "factory:\n  prompts: {path: p.jsonl}\n  checks: [empty, empty]\n")
    with pytest.raises(RecipeError, match="factory.checks: .*two checks named \\['empty'\\]; give one a `label:`"):
        load_factory_config(twice)


def test_plain_check_names_keep_the_fingerprint(tmp_path):
    base = "factory:\n  prompts: {path: p.jsonl}\n"
    plain = load_factory_config(write(tmp_path / "a.yaml", base + "  checks: [empty, truncated, refusal]\n"))
    assert plain.fingerprint()["checks"] == ["empty", "truncated", "refusal"]
    # the fingerprint of a run made before check options existed
    assert plain.fingerprint_hash() == load_factory_config(write(tmp_path / "b.yaml", base)).fingerprint_hash()
    mapped = load_factory_config(write(tmp_path / "c.yaml", base + "  checks: [{name: empty}, truncated, refusal]\n"))
    assert mapped.fingerprint_hash() == plain.fingerprint_hash()
    tuned = load_factory_config(write(tmp_path / "d.yaml", base + "  checks: [{name: near_dup, threshold: 0.9}]\n"))
    assert tuned.fingerprint()["checks"] == [{"name": "near_dup", "threshold": 0.9}]
    assert [c.name for c in build_checks(tuned.checks)] == ["near_dup"]


# ---- a whole run: every check fires a known number of times -----------------------------------------

VERIFIER = "import json\ndef not_flagged(sample):\n    return not json.loads(sample.text).get('flag')\n"
GOLDEN_PROMPT = "Which river flows through the city of Vienna in Austria?"


def craft_run(tmp_path: Path, monkeypatch) -> tuple[list[dict], dict, str]:
    """Prompt lines, the answer to each (keyed by prompt text), and the checks of the recipe."""
    (tmp_path / "run_verifiers.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "golden.jsonl").write_text(json.dumps({"prompt": GOLDEN_PROMPT, "reference": "Danube"}) + "\n")

    def good(i: int) -> str:
        return json.dumps({"answer": f"reply {i} on subject {i * 7} with detail {i * 13}"})

    story = " ".join(f"word{j}" for j in range(30))
    cases = [  # (prompt, reference, answer, expected check)
        (GOLDEN_PROMPT, None, json.dumps({"answer": "The Danube"}), "contamination"),
        ("q empty", None, "", "empty"),
        ("q long", None, json.dumps({"answer": "blah " * 80}), "truncated"),
        ("q refuse", None, "I'm sorry, but I can't help with that.", "refusal"),
        ("q short", None, "{}", "length"),
        ("q link", None, json.dumps({"answer": "see https://example.com"}), "regex"),
        ("q prose", None, "The answer is plainly forty two.", "json"),
        ("q schema", None, json.dumps({"answer": 42}), "json"),
        ("q sum", "42", json.dumps({"answer": "six times seven is 41"}), "reference"),
        ("q flagged", None, json.dumps({"answer": "fine words here", "flag": True}), "verifier"),
        ("q dup a", None, json.dumps({"answer": "Exactly The Same!"}), None),
        ("q dup b", None, json.dumps({"answer": "exactly the same"}), "exact_dup"),
        ("q near a", None, json.dumps({"answer": story + " end"}), None),
        ("q near b", None, json.dumps({"answer": story + " finish"}), "near_dup"),
    ]
    cases += [(f"q good {i}", "42" if i == 0 else None,
               json.dumps({"answer": "so it is 42"}) if i == 0 else good(i), None) for i in range(6)]
    answers = {prompt: answer for prompt, _, answer, _ in cases}
    lines = [{"id": f"p{i}", "prompt": prompt, **({"reference": ref} if ref else {})}
             for i, (prompt, ref, _, _) in enumerate(cases)]
    expected: dict[str, int] = {}
    for _, _, _, check in cases:
        if check:
            expected[check] = expected.get(check, 0) + 1
    checks = (
        "  checks:\n"
        f"    - {{name: contamination, path: {tmp_path / 'golden.jsonl'}}}\n"
        "    - empty\n    - truncated\n    - refusal\n"
        "    - {name: length, min_chars: 5}\n"
        "    - {name: regex, pattern: 'https?://', mode: must_not_match}\n"
        "    - {name: json, schema: {type: object, required: [answer], properties: {answer: {type: string}}}}\n"
        "    - {name: reference, mode: number, missing: pass}\n"
        "    - {name: verifier, function: 'run_verifiers:not_flagged'}\n"
        "    - exact_dup\n    - near_dup\n"
    )
    return lines, {"answers": answers, "expected": expected}, checks


def test_every_check_fires_the_expected_number_of_times(tmp_path, server, env_key, monkeypatch, capsys):
    lines, plan, checks = craft_run(tmp_path, monkeypatch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    server.config.responder = lambda messages, index, body: plan["answers"][messages[-1]["content"]]
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=run, prompts=prompts, provider="openai",
                          base_url=server.openai_base_url, extra=checks)
    assert main(["generate", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["stats", str(run), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    counts = {name: item["count"] for name, item in stats["rejected_by"].items()}
    assert counts == plan["expected"]
    rejected = sum(plan["expected"].values())
    assert stats["counts"] == {"accepted": len(lines) - rejected, "rejected": rejected, "failed": 0, "total": len(lines)}
    assert stats["rejected_by"]["json"]["top_reasons"] == [
        ["not JSON: Expecting value at line N column N", 1], ["schema: $.answer: N is not of type 'string'", 1]]
    assert stats["rejected_by"]["near_dup"]["top_reasons"][0][0] == "near-duplicate of <id> (Jaccard ~N)"
    assert stats["tokens"]["output"] > 0 and stats["diversity"]["distinct_1"] > 0
    # the reference travels from the prompt line onto the record
    by_prompt = {r["prompt_id"]: r for r in read_jsonl(run / "accepted.jsonl") + read_jsonl(run / "rejected.jsonl")}
    assert by_prompt["p8"]["reference"] == "42" and by_prompt["p8"]["rejected_by"] == "reference"
    assert by_prompt["p14"]["reference"] == "42" and by_prompt["p14"]["rejected_by"] is None
    # the generate run wrote the same figures into its manifest
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v["count"] for k, v in manifest["stats"]["rejected_by"].items()} == plan["expected"]
    assert manifest["counts"]["rejected_by"] == plan["expected"]
    for figures in ("diversity", "attributes", "tokens", "counts"):
        assert manifest["stats"][figures] == stats[figures]
    assert main(["stats", str(run)]) == 0
    table = capsys.readouterr().out
    assert "rejected: near_dup" in table and "distinct-2" in table


def test_stats_table_and_errors(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nothing")]) == 2
    assert "no accepted.jsonl" in capsys.readouterr().err


# ---- resume: the dedup indexes see what was accepted before -----------------------------------------

def dedup_answers(messages, index, body):
    i = int(messages[-1]["content"].split()[-1])
    text = " ".join(f"t{i % 4} w{j}" for j in range(25))  # prompts i and i + 4 answer alike...
    if i >= 8:
        text += f" closing{i}"  # ...the later ones with a different last word: near, not exact
    return text


def test_resumed_run_finds_the_same_duplicates_as_an_uninterrupted_one(tmp_path, server, env_key):
    from helpers import write_prompts

    server.config.responder = dedup_answers
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    outcomes = []
    for name, limits in (("straight", []), ("resumed", ["3", "6"])):
        run = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", output_dir=run, prompts=prompts, provider="openai",
                              base_url=server.openai_base_url, extra_teacher="    max_concurrency: 1\n",
                              extra="  checks: [empty, exact_dup, near_dup]\n")
        for limit in limits:  # stop after the first 3, then 6 prompts: each later run resumes
            assert main(["generate", str(recipe), "--limit", limit]) == 0
        assert main(["generate", str(recipe)]) == 0
        rejected = read_jsonl(run / "rejected.jsonl")
        outcomes.append(sorted((r["prompt_id"], r["rejected_by"], r["checks"][-1]["reason"]) for r in rejected))
    straight, resumed = outcomes
    assert resumed == straight
    by = [(pid, check) for pid, check, _ in straight]
    assert by == [("p10", "near_dup"), ("p11", "near_dup"), ("p4", "exact_dup"), ("p5", "exact_dup"),
                  ("p6", "exact_dup"), ("p7", "exact_dup"), ("p8", "near_dup"), ("p9", "near_dup")]


def test_prime_reads_accepted_samples_into_run_wide_checks(tmp_path):
    accepted = tmp_path / "accepted.jsonl"
    accepted.write_text(sample("Hello there, world", id="old").to_json() + "\n")
    checks = build_checks(["empty", "exact_dup"])
    assert prime(checks, accepted) == 1
    assert checks[1](sample("hello there world", id="new")).reason == "exact duplicate of old"
    assert prime(build_checks(["empty"]), accepted) == 0  # nothing run-wide: the file is not read


def test_stats_diversity_coverage_and_throughput_by_hand(tmp_path):
    """The figures of `factory stats` on a run small enough to count by hand."""
    from factory.stats import compute_stats, diversity

    figures = diversity(["a b c", "a b d"])
    assert figures["distinct_1"] == round(4 / 6, 4)   # a b c d of 6 words
    assert figures["distinct_2"] == 0.75              # ab bc bd of 4 bigrams
    assert diversity(["one two three four", "one two three four"])["mean_pairwise_jaccard_distance"] == 0.0
    far = diversity(["alpha beta gamma delta", "north south east west"])["mean_pairwise_jaccard_distance"]
    assert far > 0.95

    def record(i: int, text: str, topic: str, rejected_by: str | None = None) -> str:
        return json.dumps({"id": f"{i:024x}", "prompt": [{"role": "user", "content": "q"}],
                           "completion": [{"role": "assistant", "content": text}], "attributes": {"topic": topic},
                           "usage": {"input_tokens": 3, "output_tokens": 5, "cost_usd": 0.001},
                           "rejected_by": rejected_by, "checks": []}) + "\n"

    run = tmp_path / "run"
    run.mkdir()
    (run / "accepted.jsonl").write_text(record(1, "a b c", "maths") + record(2, "a b d", "maths")
                                        + record(3, "x y", "art"), encoding="utf-8")
    (run / "rejected.jsonl").write_text(record(4, "", "art", "empty"), encoding="utf-8")
    manifest = {"status": "complete", "totals": {"elapsed_s": 2.0}, "this_run": {"requests_per_s": 1.5}}
    stats = compute_stats(run, manifest)
    assert stats["attributes"] == {"topic": {"maths": 2, "art": 1}}  # coverage of the accepted samples
    assert stats["tokens"] == {"input": 12, "output": 20} and stats["cost_usd"] == 0.004
    assert stats["throughput"] == {"elapsed_s": 2.0, "samples_per_s": 2.0, "output_tokens_per_s": 10.0,
                                   "last_run_requests_per_s": 1.5}
    assert stats["diversity"]["distinct_1"] == round(6 / 8, 4) and stats["diversity"]["distinct_2"] == 0.8
    assert stats["acceptance_rate"] == 0.75
