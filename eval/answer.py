"""Get every model's answers to the golden prompts, with what it costs to get them.

Local models (provider local) run in-process: one load, batched greedy answers, the mean token logprob
of each answer (the student's confidence for the cascade), then a timing pass one prompt at a time
(time to first token, total latency, output tokens/s) and the model's size. Hosted models go through
the factory pipeline into `OUTPUT/answers/NAME/`, so they get its cache (a second eval pays nothing),
rate limits, retries and cost accounting.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apprentice.errors import TeacherError
from apprentice.tokens import mean_logprob
from factory.answers import answer_prompts
from factory.builtin import resolve_model
from factory.hf import encode_chat, generate_ids, generate_with_logprobs, load_model, normalize_params
from factory.pricing import pricer_for
from factory.teachers import make_teacher

from .config import ModelConfig
from .golden import GoldenItem


@dataclass
class Answer:
    text: str
    output_tokens: int = 0
    finish_reason: str | None = None
    confidence: float | None = None  # mean log-probability of the answer's tokens (local models)
    cost_usd: float = 0.0
    error: str | None = None


@dataclass
class ModelRun:
    config: ModelConfig
    answers: dict[str, Answer]
    perf: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] | None = None
    # Kept for the figures that need two local models at once (divergence, speculative decoding).
    model: Any = None
    tokenizer: Any = None
    # What this eval paid for the model, by part (answers, timed requests, throughput requests): requests,
    # tokens and cost; answers taken from the cache cost nothing again.
    spent: dict[str, dict[str, float]] = field(default_factory=dict)


def _rss_mib() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def size_on_disk(path: str) -> int | None:
    folder = Path(path)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def find_lineage(path: str) -> dict[str, Any] | None:
    """A trained student's lineage.json sits beside its merged/ folder (sft train writes both)."""
    for candidate in (Path(path) / "lineage.json", Path(path).parent / "lineage.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return None


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, 100 * q)) if values else float("nan")


# ---- local ------------------------------------------------------------------------------------------
def run_local(config: ModelConfig, items: list[GoldenItem], *, perf_prompts: int, progress: Any) -> ModelRun:
    import torch

    params = normalize_params(config.params)
    before = _rss_mib()
    start = time.perf_counter()
    model, tokenizer = load_model(config.model, config.device)
    load_s = time.perf_counter() - start
    loaded_mib = _rss_mib() - before
    rows = [encode_chat(tokenizer, config.with_context(item.messages)) for item in items]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    task = progress.add_task(f"{config.name}: answering", total=len(rows))
    answers: dict[str, Answer] = {}
    answering = time.perf_counter()
    for begin in range(0, len(order), config.batch_size):
        chunk = order[begin:begin + config.batch_size]
        # The generate returns each sampled token's logprob (raw logits): the answer's confidence comes
        # with it, without a second forward pass.
        outs, logprobs = generate_with_logprobs(
            model, tokenizer, [rows[i] for i in chunk], top_logprobs=1, max_new_tokens=params["max_tokens"],
            temperature=params["temperature"], top_p=params["top_p"], top_k=params.get("top_k", 0),
            seed=params.get("seed"))
        for i, completion, token_logprobs in zip(chunk, outs, logprobs):
            answers[items[i].key] = Answer(completion.text, completion.output_tokens, completion.finish_reason,
                                           confidence=mean_logprob(token_logprobs, completion.finish_reason))
        progress.advance(task, len(chunk))
    answer_s = time.perf_counter() - answering
    progress.update(task, description=f"{config.name}: timing")
    perf = _time_local(model, tokenizer, [rows[i] for i in range(min(perf_prompts, len(rows)))], params)
    path = resolve_model(config.model)
    perf.update(
        load_s=round(load_s, 2),
        loaded_mib=round(loaded_mib, 1),
        parameters=sum(p.numel() for p in model.parameters()),
        disk_bytes=size_on_disk(path),
        device=str(model.device),
        threads=torch.get_num_threads(),
        # Throughput at the model's batch_size: the answering pass, every golden prompt (model load excluded).
        batch_size=config.batch_size,
        answers_per_s=round(len(rows) / answer_s, 3) if answer_s > 0 else None,
    )
    if torch.cuda.is_available() and str(model.device).startswith("cuda"):
        perf["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    progress.update(task, description=f"{config.name}: done")
    return ModelRun(config, answers, perf, find_lineage(path), model, tokenizer)


def _time_local(model: Any, tokenizer: Any, rows: list[list[int]], params: dict[str, Any]) -> dict[str, Any]:
    """One prompt at a time, as a user waits for it: time to first token and total latency."""
    if not rows:
        return {}
    ttft, total, tokens = [], [], []
    generate_ids(model, tokenizer, rows[:1], max_new_tokens=2)  # warm-up, not counted
    for row in rows:
        start = time.perf_counter()
        generate_ids(model, tokenizer, [row], max_new_tokens=1)
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = generate_ids(model, tokenizer, [row], max_new_tokens=params["max_tokens"])
        total.append(time.perf_counter() - start)
        tokens.append(out[0].output_tokens)
    return {
        "timed_prompts": len(rows),
        "ttft_p50_s": round(percentile(ttft, 0.5), 4),
        "ttft_p99_s": round(percentile(ttft, 0.99), 4),
        "latency_p50_s": round(percentile(total, 0.5), 4),
        "latency_p99_s": round(percentile(total, 0.99), 4),
        "latency_mean_s": round(statistics.fmean(total), 4),
        "latencies_s": [round(t, 4) for t in total],
        "output_tokens_per_s": round(sum(tokens) / sum(total), 2) if sum(total) > 0 else None,
    }


def local_cost(perf: dict[str, Any], gpu_hour_usd: float | None, cpu_hour_usd: float | None) -> float | None:
    """$ per 1k answers of a local model: the machine's hourly price over the measured answers per hour."""
    hour_usd = gpu_hour_usd if str(perf.get("device", "")).startswith("cuda") else cpu_hour_usd
    return machine_cost(perf, hour_usd)


def machine_cost(perf: dict[str, Any], hour_usd: float | None) -> float | None:
    """$ per 1k answers of a model on a machine of one's own: its hourly price over the answers per hour measured
    (a local model's answering pass, a served model's throughput pass)."""
    if hour_usd is None or not perf.get("answers_per_s"):
        return None
    return 1000 * hour_usd / (3600 * perf["answers_per_s"])


# ---- hosted -----------------------------------------------------------------------------------------
@dataclass
class Sent:
    """Requests sent past the cache (timing, throughput): each latency, the wall time of them all, what they
    used and cost, and the first error (failures are data: the report says why a figure is missing)."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None

    def spent(self) -> dict[str, float]:
        return {"requests": len(self.latencies), "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cost_usd": round(self.cost_usd, 6)}


def send_past_cache(config: ModelConfig, prompts: list[list[dict[str, str]]], concurrency: int) -> Sent:
    """Each prompt sent once through the teacher's own client (no cache, no limiter), `concurrency` at a time;
    after an error no further request starts."""
    async def sending() -> Sent:
        teacher = make_teacher(config)
        pricer, _ = pricer_for(config, None, f"eval.models.{config.name}")
        sent, slots = Sent(), asyncio.Semaphore(concurrency)

        async def one(messages: list[dict[str, str]]) -> None:
            async with slots:
                if sent.error is not None:
                    return
                start = time.perf_counter()
                try:
                    response = await teacher.complete(teacher.build_request(config.with_context(messages), 1))
                except TeacherError as exc:
                    sent.error = sent.error or str(exc)
                    return
                sent.latencies.append(time.perf_counter() - start)
                sent.input_tokens += response.input_tokens
                sent.output_tokens += response.output_tokens
                sent.cost_usd += pricer.cost_of(response)

        began = time.perf_counter()
        try:
            await asyncio.gather(*(one(messages) for messages in prompts))
        finally:
            sent.wall_s = time.perf_counter() - began
            await teacher.aclose()
        return sent

    return asyncio.run(sending())


def time_hosted(config: ModelConfig, items: list[GoldenItem], count: int) -> tuple[dict[str, Any], Sent]:
    """Request latency, one request at a time as a user waits for it, past the cache (the answering pass
    may come from it): `count` golden prompts sent again through the teacher's own client."""
    sent = send_past_cache(config, [item.messages for item in items[:count]], 1)
    perf: dict[str, Any] = {"timed_prompts": len(sent.latencies), "timing_cost_usd": round(sent.cost_usd, 6)}
    if sent.error is not None:
        perf["timing_error"] = sent.error
    if sent.latencies:
        total = sum(sent.latencies)
        perf.update(latency_p50_s=round(percentile(sent.latencies, 0.5), 4),
                    latency_p99_s=round(percentile(sent.latencies, 0.99), 4),
                    latency_mean_s=round(statistics.fmean(sent.latencies), 4),
                    latencies_s=[round(t, 4) for t in sent.latencies],
                    output_tokens_per_s=round(sent.output_tokens / total, 2) if total > 0 else None)
    return perf, sent


def served_throughput(config: ModelConfig, items: list[GoldenItem], concurrency: int) -> tuple[dict[str, Any], Sent]:
    """Throughput of a model on an OpenAI-compatible server, as the local answering pass measures it: every
    golden prompt once (repeated until there are `concurrency` of them), `concurrency` in flight at a time,
    past the cache; answers/s and output tokens/s over the wall time of them all."""
    count = max(len(items), concurrency)
    sent = send_past_cache(config, [items[i % len(items)].messages for i in range(count)], concurrency)
    perf: dict[str, Any] = {"concurrency": concurrency, "throughput_requests": len(sent.latencies),
                            "throughput_cost_usd": round(sent.cost_usd, 6)}
    if sent.error is not None:
        perf["throughput_error"] = sent.error
    elif sent.wall_s > 0:
        perf.update(answers_per_s=round(len(sent.latencies) / sent.wall_s, 3),
                    batch_output_tokens_per_s=round(sent.output_tokens / sent.wall_s, 2))
    return perf, sent


def run_hosted(config: ModelConfig, items: list[GoldenItem], output_dir: Path, console: Any) -> ModelRun:
    """Answers through a factory run: cached, rate-limited, priced; failures stay failures."""
    prompts = [{"id": item.key, "prompt": item.messages} for item in items]
    result = answer_prompts(config.model_dump(exclude={"name", "role"}), prompts, output_dir / "answers",
                            name=config.name, console=console)
    answers = {key: Answer(a.text, a.output_tokens, a.finish_reason, cost_usd=a.cost_usd, error=a.error)
               for key, a in result.by_id.items()}
    for item in items:  # a stopped run (budget, Ctrl-C) leaves some unanswered: they score 0, and say so
        answers.setdefault(item.key, Answer("", error=f"no answer ({result.status})"))
    cost = sum(a.cost_usd for a in answers.values())
    answered = sum(1 for a in answers.values() if a.error is None)
    perf = {"cost_usd": round(cost, 6), "usd_per_1k_answers": round(1000 * cost / answered, 4) if answered else None,
            "status": result.status}
    return ModelRun(config, answers, perf, spent={"answers": result.spent})
