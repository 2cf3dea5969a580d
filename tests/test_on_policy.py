"""On-policy distillation (sft/on_policy.py, sft/on_policy_trainer.py) on tiny random Llamas: the method keys,
the guards, the teacher's positions on the student's completions, and that training lowers the divergence."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import CHAT_TEMPLATE, build_tiny_llama

from apprentice.errors import RecipeError
from sft.config import SFTConfig

torch.set_num_threads(1)

LETTERS = "abcdefghijklmnop"
CONTEXT = [{"role": "system", "content": "answer"}, {"role": "user", "content": "c d"},
           {"role": "assistant", "content": "C"}]


def tiny_pair(root: Path, shift: float = 2.0) -> tuple[Path, Path]:
    """A student and a teacher of one family: a tiny random Llama with a scaled-up output head (peaked
    distributions, where the divergence means something), and the same model with a random rank-4 change to
    each MLP's down projection (a change a LoRA adapter can learn)."""
    from transformers import AutoModelForCausalLM

    student = build_tiny_llama(root / "student", seed=0)
    model = AutoModelForCausalLM.from_pretrained(student)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.save_pretrained(student)
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight
            left = torch.randn(weight.shape[0], 4, generator=generator)
            right = torch.randn(4, weight.shape[1], generator=generator)
            weight.add_(shift * (left @ right) / weight.shape[1] ** 0.5)
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        source = student / name
        if source.is_file():
            (teacher / name).write_bytes(source.read_bytes())
    return student, teacher


def write_run(run: Path, teacher: Path | str, count: int = 32, context: list | None = CONTEXT) -> Path:
    """A factory run's records ('x y' → 'X') and the manifest naming its teacher, as `factory generate` writes."""
    run.mkdir(parents=True)
    with (run / "accepted.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(count):
            first, second = LETTERS[i % 16], LETTERS[(i * 7 + 3) % 16]
            handle.write(json.dumps({
                "id": f"s{i}", "prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"{first} {second}"}],
                "completion": [{"role": "assistant", "content": first.upper()}],
            }) + "\n")
    teacher_section = {"provider": "local", "model": str(teacher), **({"context": context} if context else {})}
    (run / "manifest.json").write_text(json.dumps({"recipe": {"teacher": teacher_section}}), encoding="utf-8")
    return run


def on_policy_config(student: Path, run: Path, out: Path, **extra) -> SFTConfig:
    section = {
        "student": str(student), "data": [str(run)], "output_dir": str(out), "held_out": 0.25, "seed": 0,
        "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "per_device_batch_size": 8,
        "max_steps": 16, "logging_steps": 1, "eval_every_steps": 100, "gradient_checkpointing": False,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "method": "on_policy",
        "on_policy": {"max_completion_length": 6},
    }
    section.update(extra)
    return SFTConfig(**section)


@torch.no_grad()
def first_token_kl(student, teacher, tokenizer, prompts: list[str], context: list | None) -> float:
    """Mean exact KL(student ‖ teacher) of the first answer token: the student reads the bare prompt, the
    teacher the prompt after `context`."""
    total = 0.0
    for text in prompts:
        bare = [{"role": "user", "content": text}]
        ids = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
               for messages in (bare, (context or []) + bare)]
        student_lp = torch.log_softmax(student(torch.tensor([ids[0]])).logits[0, -1], dim=-1)
        teacher_lp = torch.log_softmax(teacher(torch.tensor([ids[1]])).logits[0, -1], dim=-1)
        total += float((student_lp.exp() * (student_lp - teacher_lp)).sum())
    return total / len(prompts)


def load_student(base: Path, adapter: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("on-policy-models")
    student, teacher = tiny_pair(root)
    return {"student": student, "teacher": teacher, "tokenizer": AutoTokenizer.from_pretrained(student),
            "teacher_model": AutoModelForCausalLM.from_pretrained(teacher).eval()}


# ---- the method keys -------------------------------------------------------------------------------------------
def test_method_follows_the_old_keys_and_refuses_two_methods_at_once():
    assert SFTConfig(data=["x"]).method == "sft", "no distill, no on_policy: plain sft"
    assert SFTConfig(data=["x"], distill={}).method == "kd", "sft.distill alone still means kd"
    assert SFTConfig(data=["x"], method="kd").distill is not None, "method: kd gets the default distill settings"
    chosen = SFTConfig(data=["x"], method="on_policy")
    assert chosen.on_policy is not None and chosen.on_policy.beta == 1.0, "on_policy defaults to reverse KL"
    with pytest.raises(ValueError, match="method: sft with distill set"):
        SFTConfig(data=["x"], method="sft", distill={})
    with pytest.raises(ValueError, match="method: kd with on_policy set"):
        SFTConfig(data=["x"], distill={}, on_policy={})


def test_a_teacher_that_cannot_run_here_or_is_not_named_is_refused(tmp_path):
    from sft.on_policy import resolve_teacher

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RecipeError, match="no teacher named and .*manifest.json records none"):
        resolve_teacher(SFTConfig(data=[str(run)], method="on_policy"))
    hosted = SFTConfig(data=[str(run)], method="on_policy",
                       on_policy={"teacher": {"provider": "openai", "model": "gpt-4o-mini"}})
    with pytest.raises(RecipeError, match="provider openai .*gpt-4o-mini.* cannot score the student's tokens.*"
                                          "base_url"):
        resolve_teacher(hosted)
    served = SFTConfig(data=[str(run)], method="on_policy", on_policy={"teacher": {
        "provider": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}})
    assert resolve_teacher(served).base_url == "http://127.0.0.1:1/v1", "a server of one's own scores over HTTP"


# ---- the guards ------------------------------------------------------------------------------------------------
def test_guards_refuse_mismatched_pairs_naming_both(tmp_path, models):
    from transformers import AutoTokenizer

    from sft.on_policy import check_pair

    student = models["tokenizer"]
    bigger = AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path / "bigger", extra_words=("zzz",)))
    with pytest.raises(RecipeError, match=r"student S has 40 logits per token and the teacher T 41"):
        check_pair(student, bigger, 40, 41, "S", "T")
    with pytest.raises(RecipeError, match=r"student's tokenizer is not the teacher's.*Student: S .*teacher: T "):
        check_pair(student, bigger, 40, 40, "S", "T")
    other_template = AutoTokenizer.from_pretrained(models["student"])
    other_template.chat_template = CHAT_TEMPLATE.replace("<|im_start|>{{ m['role'] }} ", "<|im_start|> {{ m['role'] }} ")
    with pytest.raises(RecipeError, match=r"the student S and the teacher T have different chat templates"):
        check_pair(student, other_template, 40, 40, "S", "T")
    check_pair(student, AutoTokenizer.from_pretrained(models["teacher"]), 40, 40, "S", "T")  # one family: accepted


def test_training_refuses_a_teacher_of_another_vocabulary_before_it_trains(tmp_path, models):
    from sft.train import train

    other = build_tiny_llama(tmp_path / "other", extra_words=("zzz",))
    run = write_run(tmp_path / "run", other)
    with pytest.raises(RecipeError, match=rf"student {models['student']} has 40 logits .* teacher {other} 41"):
        train(on_policy_config(models["student"], run, tmp_path / "out"), export_merged=False)
    assert not (tmp_path / "out" / "adapter").exists(), "nothing was trained"


# ---- positions -------------------------------------------------------------------------------------------------
def test_teacher_positions_align_on_variable_length_completions_without_nan(tmp_path, models):
    """The teacher reads [context + prompt | completion] and the student [prompt | completion], padded as the
    trainer pads a batch; each completion token must get the teacher's distribution after exactly the tokens
    before it, as when the teacher reads that one sequence alone."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig

    from sft.on_policy_trainer import OnPolicyTrainer, completion_logprobs

    tokenizer = models["tokenizer"]
    tokenizer.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    teacher = models["teacher_model"]
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                              gradient_checkpointing=False, max_completion_length=6)
    trainer = OnPolicyTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "a b"}]}]))
    vocab = tokenizer.get_vocab()
    texts = ["a b", "c d e f g", "h"]
    completions = [[vocab["A"]], [vocab["C"], vocab["D"], vocab["E"], vocab["<|im_end|>"]], [vocab["H"], vocab["B"]]]

    def encode(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    student_prompts = [encode([{"role": "user", "content": t}]) for t in texts]
    teacher_prompts = [encode(CONTEXT + [{"role": "user", "content": t}]) for t in texts]
    from trl.trainer.utils import pad

    def left(rows):
        return (pad([torch.tensor(r) for r in rows], padding_value=0, padding_side="left"),
                pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0, padding_side="left"))

    prompt_ids, prompt_mask = left(student_prompts)
    teacher_ids, teacher_mask = left(teacher_prompts)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "teacher_prompt_ids": teacher_ids, "teacher_prompt_mask": teacher_mask,
        "completion_ids": pad([torch.tensor(c) for c in completions], padding_value=0, padding_side="right"),
        "completion_mask": pad([torch.ones(len(c), dtype=torch.long) for c in completions], padding_value=0,
                               padding_side="right"),
    }
    trainer.model.train()
    loss, _, count = trainer._compute_loss(trainer.model, inputs, None)
    assert torch.isfinite(loss), f"the loss is {loss}"
    assert int(count) == sum(map(len, completions)), "every completion token and no padding is scored"
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "a gradient is NaN or infinite"

    head = teacher.get_output_embeddings()
    batched = torch.log_softmax(head(trainer._hidden["teacher"]).float(), dim=-1)
    for row, (prompt, completion) in enumerate(zip(teacher_prompts, completions)):
        with torch.no_grad():
            alone = torch.log_softmax(teacher(torch.tensor([prompt + completion])).logits[0].float(), dim=-1)
        expected = alone[len(prompt) - 1:len(prompt) - 1 + len(completion)]
        assert torch.allclose(batched[row, :len(completion)], expected, atol=1e-4), f"row {row} is misaligned"
    helper = completion_logprobs(teacher, teacher_prompts, completions)
    assert all(torch.allclose(h, batched[i, :len(c)], atol=1e-4) for i, (h, c) in enumerate(zip(helper, completions)))


# ---- training --------------------------------------------------------------------------------------------------
def test_on_policy_steps_lower_the_reverse_kl_to_a_fixed_teacher(tmp_path, models):
    from sft.train import train

    run = write_run(tmp_path / "run", models["teacher"], context=None)
    result = train(on_policy_config(models["student"], run, tmp_path / "out"), export_merged=False)
    prompts = [f"{LETTERS[i % 16]} {LETTERS[(i * 7 + 3) % 16]}" for i in range(32)]
    tokenizer, teacher = models["tokenizer"], models["teacher_model"]
    before = first_token_kl(load_student(models["student"]), teacher, tokenizer, prompts, None)
    after = first_token_kl(load_student(models["student"], result.adapter_dir), teacher, tokenizer, prompts, None)
    assert after < 0.6 * before, f"reverse KL of the first answer token {before:.3f} → {after:.3f}"

    logged = [entry for entry in json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-16" /
                                              "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(logged) == 16, "one log entry per step"
    for key in ("reverse_kl", "teacher_tokens", "scored_tokens", "completions/mean_length"):
        assert all(math.isfinite(entry[key]) for entry in logged), f"{key} is logged at every step"
    assert logged[-1]["reverse_kl"] < logged[0]["reverse_kl"], "the logged reverse KL falls too"
    lineage = json.loads(result.lineage_path.read_text())
    assert lineage["method"] == "on_policy"
    assert lineage["on_policy"]["teacher"]["model"] == str(models["teacher"])
    scoring = lineage["on_policy"]["scoring"]["train"]
    assert scoring["samples"] == 16 * 8, "16 steps of 8 samples scored in training"
    assert scoring["teacher_tokens"] > scoring["scored_tokens"] > 0, "the teacher reads prompts and completions"


class ScoringServer:
    """A loopback stand-in for a vLLM server's `/v1/completions` with `prompt_logprobs`, its scores computed by a
    real model: the served-teacher path (factory/teachers/scoring.py over HTTP, the trainer's sampled-token loss)
    runs for real without a vLLM. Counts its requests; tests/test_vllm.py runs the same against vLLM itself."""

    def __init__(self, model) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.requests = 0
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                ids, k = body["prompt"], body["prompt_logprobs"]
                with lock, torch.no_grad():
                    server.requests += 1
                    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                rows = [None]
                for position in range(1, len(ids)):
                    row = logprobs[position - 1]
                    best = torch.topk(row, k).indices.tolist()
                    rows.append({str(token): {"logprob": float(row[token]), "rank": 1, "decoded_token": ""}
                                 for token in {*best, ids[position]}})
                payload = json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                      "choices": [{"index": 0, "text": "", "finish_reason": "length",
                                                   "prompt_logprobs": rows}],
                                      "usage": {"prompt_tokens": len(ids), "completion_tokens": 1,
                                                "total_tokens": len(ids) + 1}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_a_served_teacher_trains_the_student_on_the_sampled_tokens_reverse_kl(tmp_path, models):
    from sft.train import train

    server = ScoringServer(models["teacher_model"])
    try:
        run = write_run(tmp_path / "run", models["teacher"], context=None)
        teacher = {"provider": "openai", "model": "tiny-teacher", "base_url": server.base_url,
                   "logprobs": {"tokenizer": str(models["teacher"])}}
        # One sampled token per position is a noisier signal than the whole distribution: a smaller step, more steps.
        config = on_policy_config(models["student"], run, tmp_path / "out", learning_rate=1e-3,
                                  max_steps=32, on_policy={"max_completion_length": 6, "teacher": teacher})
        result = train(config, export_merged=False)
    finally:
        server.close()
    # One scoring request per sample: 32 steps of 8, and the 8 held-out prompts at each of the two evaluations
    # (the trainer's at its last step, and sft train's own after it).
    assert server.requests == 32 * 8 + 2 * 8
    prompts = [f"{LETTERS[i % 16]} {LETTERS[(i * 7 + 3) % 16]}" for i in range(32)]
    tokenizer, teacher_model = models["tokenizer"], models["teacher_model"]
    before = first_token_kl(load_student(models["student"]), teacher_model, tokenizer, prompts, None)
    after = first_token_kl(load_student(models["student"], result.adapter_dir), teacher_model, tokenizer, prompts,
                           None)
    assert after < 0.8 * before, f"reverse KL of the first answer token {before:.3f} → {after:.3f}"
    lineage = json.loads(result.lineage_path.read_text())
    assert lineage["on_policy"]["teacher"]["provider"] == "openai"
    metrics = lineage["metrics"]  # held out, the loss is the divergence estimate, not the training surrogate
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_reverse_kl"], abs=1e-5)
    scoring = lineage["on_policy"]["scoring"]["train"]
    assert scoring["samples"] == 32 * 8 and scoring["teacher_tokens"] > scoring["scored_tokens"] > 0
    assert lineage["on_policy"]["reverse_kl_first"] is not None and math.isfinite(lineage["on_policy"]["reverse_kl_last"])


def test_a_served_teacher_that_is_down_stops_training_with_the_connection_error(tmp_path, models):
    from apprentice.errors import TeacherError
    from sft.train import train

    server = ScoringServer(models["teacher_model"])
    server.close()  # nothing listens on its port any more
    run = write_run(tmp_path / "run", models["teacher"], context=None)
    teacher = {"provider": "openai", "model": "tiny-teacher", "base_url": server.base_url, "max_retries": 0,
               "logprobs": {"tokenizer": str(models["teacher"])}}
    config = on_policy_config(models["student"], run, tmp_path / "out", held_out=0, max_steps=2,
                              on_policy={"max_completion_length": 4, "teacher": teacher})
    with pytest.raises(TeacherError, match="connection error"):
        train(config, export_merged=False)
    assert not (tmp_path / "out" / "lineage.json").exists(), "no lineage for a student that did not train"


def test_a_served_teacher_without_a_readable_tokenizer_is_refused_naming_the_key(tmp_path, models):
    from sft.train import train

    run = write_run(tmp_path / "run", models["teacher"], context=None)
    config = on_policy_config(models["student"], run, tmp_path / "out", on_policy={"teacher": {
        "provider": "openai", "model": "no-such-served-model", "base_url": "http://127.0.0.1:1/v1"}})
    with pytest.raises(RecipeError, match="sft.on_policy.teacher.logprobs.tokenizer"):
        train(config, export_merged=False)


def test_the_context_variant_lowers_the_kl_on_held_out_prompts_to_a_teacher_with_context(tmp_path, models):
    """The demo's setting: the teacher is the student's own base with a context the student never reads. Only
    the context separates them, so training with it moves the student towards the teacher-with-context on
    prompts it never trained on, and training without it has nothing to learn."""
    from sft.data import load_splits
    from sft.train import train

    run = write_run(tmp_path / "run", models["student"], context=CONTEXT)
    _, held, _ = load_splits([run], 0.25, 0, None)
    prompts = [prompt[-1]["content"] for prompt in held["prompt"]]
    tokenizer, base = models["tokenizer"], models["student"]
    teacher = load_student(base)
    before = first_token_kl(load_student(base), teacher, tokenizer, prompts, CONTEXT)
    after = {}
    for use in (True, False):
        config = on_policy_config(base, run, tmp_path / f"out-{use}", on_policy={"max_completion_length": 6,
                                                                                  "use_context": use})
        result = train(config, export_merged=False)
        after[use] = first_token_kl(load_student(base, result.adapter_dir), teacher, tokenizer, prompts, CONTEXT)
    assert before > 0.02, f"the context changes the teacher ({before:.4f})"
    assert after[True] < 0.5 * before, f"with context: held-out KL {before:.4f} → {after[True]:.4f}"
    assert after[False] == pytest.approx(before, rel=1e-3), "without context the teacher is the student: no change"


# ---- starting from a trained student -----------------------------------------------------------------------
@pytest.mark.slow
def test_init_from_starts_on_policy_from_an_sft_students_adapter(tmp_path, models):
    from safetensors.torch import load_file

    from sft.train import train

    run = write_run(tmp_path / "run", models["student"], context=CONTEXT)
    sft_section = on_policy_config(models["student"], run, tmp_path / "sft", method="sft", on_policy=None,
                                   max_steps=2, learning_rate=5e-2, max_length=32)
    first = train(sft_section, export_merged=False)
    # A learning rate too small to move anything: the on-policy adapter is the sft adapter it started from.
    second = train(on_policy_config(models["student"], run, tmp_path / "op", init_from=str(tmp_path / "sft"),
                                    max_steps=1, learning_rate=1e-12), export_merged=False)
    start, end = (load_file(result.adapter_dir / "adapter_model.safetensors") for result in (first, second))
    assert start.keys() == end.keys(), "the same adapter modules"
    moved = [name for name in start if "lora_B" in name and start[name].abs().max() > 0]
    assert moved, "sft trained the adapter (its B matrices are no longer zero)"
    assert all(torch.allclose(start[name], end[name], atol=1e-6) for name in start), "on_policy began from sft's adapter"
    lineage = json.loads(second.lineage_path.read_text())
    assert lineage["sft"]["init_from"] == str(tmp_path / "sft") and lineage["method"] == "on_policy"


def test_init_from_refuses_a_folder_without_adapter_and_another_base(tmp_path, models):
    from sft.on_policy import adapter_folder

    run = write_run(tmp_path / "run", models["student"])
    with pytest.raises(RecipeError, match="no LoRA adapter there"):
        adapter_folder(on_policy_config(models["student"], run, tmp_path / "o", init_from=str(tmp_path)))
    trained = tmp_path / "trained"
    (trained / "adapter").mkdir(parents=True)
    (trained / "adapter" / "adapter_config.json").write_text("{}")
    (trained / "lineage.json").write_text(json.dumps({"base_model": {"name": "other/model"}}))
    with pytest.raises(RecipeError, match="was trained on other/model, and sft.student is"):
        adapter_folder(on_policy_config(models["student"], run, tmp_path / "o", init_from=str(trained)))


# ---- a served teacher's scores ---------------------------------------------------------------------------------
def test_served_scores_read_the_completions_rows_of_prompt_logprobs_and_refuse_an_answer_without_them():
    from apprentice.errors import TeacherError
    from factory.recipe import TeacherConfig
    from factory.teachers.scoring import ServedScorer, parse_prompt_logprobs

    def entry(*pairs):
        return {str(token): {"logprob": logprob, "rank": rank, "decoded_token": "x"}
                for rank, (token, logprob) in enumerate(pairs, 1)}

    # Prompt [5, 6], completion [7, 9]: rows 2 and 3 are the completion's; token 9 ranks below the k = 2 best.
    data = {"choices": [{"prompt_logprobs": [None, entry((6, -0.1)), entry((7, -0.2), (8, -1.9)),
                                             entry((4, -0.3), (3, -1.5), (9, -4.0))]}]}
    scores = parse_prompt_logprobs(data, 2, [7, 9], k=2)
    assert scores.sampled_logprobs.tolist() == pytest.approx([-0.2, -4.0])
    assert scores.top_ids.tolist() == [[7, 8], [4, 3]], "the k best, best first, the sampled token cut when below"
    with pytest.raises(TeacherError, match="no usable prompt_logprobs"):
        parse_prompt_logprobs({"choices": [{"text": "x"}]}, 2, [7, 9], k=2)
    with pytest.raises(TeacherError, match="needs an OpenAI-compatible vLLM server"):
        ServedScorer(TeacherConfig(provider="local", model="builtin:smollm2-135m-instruct"))
    request = ServedScorer(TeacherConfig(provider="openai", model="m", base_url="http://127.0.0.1:9/v1"),
                           top_k=3).build_request([1, 2])
    assert request["top_p"] == 1.0 and request["temperature"] == 1.0, "untruncated: the model's own distribution"
    assert request["prompt_logprobs"] == 3 and request["echo"] is True and request["max_tokens"] == 1
