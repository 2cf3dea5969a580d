"""`routing.mode: learned`: a small classifier, fitted on the shadow log, that says how likely the student's answer
is to agree with the teacher's, from the student's confidence, the prompt's and the answer's lengths and an
embedding of the prompt (`routing.embedding`): a hashed bag of its words (`hashed`, the default: cheap, but blind
to words it was not fitted on), or a sentence-embedding model's vector (`semantic`: all-MiniLM-L6-v2, the
semantic_dup check's model, loaded by quality_checks/embedding.py; or any such model's folder or HF id), which
places paraphrases and synonyms near each other. It is reported against confidence-only routing on held-out
shadow comparisons: quality (agreement with the teacher, routed requests counting as the teacher's own answer)
at each routed share, the eval cascade's curve; a model embedding's router beside the hashed one on the same split.

Fitting needs scikit-learn (imported where it is used); serving reads the weights from JSON, and the embedding
model the router JSON names, loaded once at start-up. That model embeds off the event loop, on one thread, the
prompts that arrive while it works going together as the next batch.
"""
from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.errors import ApprenticeError
from apprentice.text import fold_text
from factory.served_log import iter_served
from quality_checks.embedding import DEFAULT_MODEL, Embedder, load_embedder

HASHED = "hashed"   # routing.embedding: the prompt's words hashed into buckets
SEMANTIC = "semantic"  # routing.embedding: the default sentence-embedding model (DEFAULT_MODEL)
HASHED_WORDS = 64   # the prompt's words hashed into this many buckets (the "embedding": cheap and stable)
HELD_OUT = 0.2      # the share of comparisons kept out of the fit, chosen by the request id's hash
MIN_PAIRS = 20
BATCH = 32          # prompts embedded together at most, when fitting and when serving
BASE_FEATURES = 3   # confidence, log prompt length, log answer length: then the prompt's embedding


@dataclass(slots=True)
class Pair:
    """One shadow comparison: the student's answer to a request, its confidence, and whether the teacher agreed."""

    id: str
    prompt: list[dict[str, str]]
    answer: str
    confidence: float
    agree: bool


def prompt_text(prompt: list[dict[str, str]]) -> str:
    return " ".join(message["content"] for message in prompt)


def hashed_words(text: str) -> list[float]:
    buckets = [0.0] * HASHED_WORDS
    for word in fold_text(text).split():
        buckets[zlib.crc32(word.encode("utf-8")) % HASHED_WORDS] += 1.0
    norm = math.sqrt(sum(v * v for v in buckets)) or 1.0
    return [v / norm for v in buckets]


def features(prompt: list[dict[str, str]], answer: str, confidence: float,
             vector: Sequence[float] | None = None) -> list[float]:
    """The classifier's inputs; `vector` is the prompt's embedding (default: its hashed words)."""
    text = prompt_text(prompt)
    vector = hashed_words(text) if vector is None else vector
    return [confidence, math.log1p(len(text)), math.log1p(len(answer))] + [float(v) for v in vector]


def prompt_vectors(prompts: list[list[dict[str, str]]], embedder: Embedder | None) -> list[list[float]]:
    """The prompts' embeddings: the model's (in batches of similar length), or their hashed words."""
    texts = [prompt_text(prompt) for prompt in prompts]
    if embedder is None:
        return [hashed_words(text) for text in texts]
    return embedder.many(texts, BATCH).tolist()


def embedding_model(embedding: str) -> str | None:
    """The sentence-embedding model a `routing.embedding` names; None for hashed words."""
    if embedding == HASHED:
        return None
    return DEFAULT_MODEL if embedding == SEMANTIC else embedding


def load_prompt_embedder(embedding: str, where: str) -> Embedder:
    """The model `embedding` names, loaded once per process; `where` says which setting named it."""
    model = embedding_model(embedding)
    assert model is not None
    try:
        return load_embedder(model, None, None)
    except (ApprenticeError, ImportError, OSError, ValueError) as exc:
        raise ApprenticeError(
            f"{where}: the prompt embedding {embedding!r} cannot be loaded here: {exc}; install its model (for "
            "semantic: pip install 'apprentice[semantic]'), or use routing.embedding: hashed (a router fitted "
            "with a model needs it: refit with `apprentice serve RECIPE.yaml --fit-router --set "
            "serve.routing.embedding=hashed`)") from None


def shadow_pairs(log_dir: Path) -> list[Pair]:
    """The shadow comparisons of the served log where the student's confidence is known."""
    requests: dict[str, dict[str, Any]] = {}
    pairs = []
    for record in iter_served(log_dir):
        if "shadow_of" not in record:
            requests[record["id"]] = record
            continue
        request = requests.get(record["shadow_of"])
        if request is None or "agree" not in record:
            continue
        if request.get("answered_by") == "student":
            answer, confidence = request["completion"][0]["content"], request.get("student_confidence")
        else:  # the teacher answered; the shadow asked the student
            answer, confidence = record["completion"][0]["content"], record.get("confidence")
        if confidence is not None:
            pairs.append(Pair(request["id"], request["prompt"], answer, confidence, bool(record["agree"])))
    return pairs


def held_out(pair: Pair) -> bool:
    return zlib.crc32(pair.id.encode("utf-8")) % 1000 < HELD_OUT * 1000


class LearnedRouter:
    """Logistic weights over `features`; `embedding` names the prompt embedding they were fitted with, and
    `embedder` is that model (None for hashed words)."""

    def __init__(self, weights: list[float], bias: float, embedding: str = HASHED,
                 embedder: Embedder | None = None) -> None:
        self.weights = weights
        self.bias = bias
        self.embedding = embedding
        self.embedder = embedder
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None  # the task embedding what waits, while there is some
        self._thread: ThreadPoolExecutor | None = None

    def agreement(self, prompt: list[dict[str, str]], answer: str, confidence: float,
                  vector: Sequence[float] | None = None) -> float:
        """The probability that the teacher would give the same answer (`vector`: the prompt's embedding)."""
        if vector is None:
            vector = prompt_vectors([prompt], self.embedder)[0]
        z = self.bias + sum(w * x for w, x in zip(self.weights, features(prompt, answer, confidence, vector)))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    async def agreement_served(self, prompt: list[dict[str, str]], answer: str, confidence: float) -> float:
        """`agreement` on the response path: hashed words inline (microseconds), a model's embedding off the
        event loop, batched with the prompts that wait for it."""
        if self.embedder is None:
            return self.agreement(prompt, answer, confidence)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt_text(prompt), future))
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return self.agreement(prompt, answer, confidence, await future)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="prompt-embedding")
        try:
            while self._pending:
                batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
                assert self.embedder is not None
                try:
                    rows = await loop.run_in_executor(self._thread, self.embedder, [text for text, _ in batch])
                except Exception as exc:  # each waiting request hears it; the router decides what to do
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row in zip(batch, rows.tolist()):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._drainer = None

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def save(self, path: Path) -> None:
        data: dict[str, Any] = {"kind": "logistic", "embedding": self.embedding,
                                "dimensions": len(self.weights) - BASE_FEATURES}
        if self.embedding == HASHED:
            data["hashed_words"] = HASHED_WORDS
        path.write_text(json.dumps({**data, "weights": self.weights, "bias": self.bias}), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "LearnedRouter":
        """The router at `path`, with the embedding model it was fitted with loaded (a router without
        `embedding`, from before there was a choice, hashed words)."""
        where = f"serve.routing.router: {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("kind") != "logistic":
                raise ValueError("not a router this version wrote")
            weights, bias = [float(w) for w in data["weights"]], float(data["bias"])
            embedding = data.get("embedding", HASHED)
            if not isinstance(embedding, str) or not embedding:
                raise ValueError(f"embedding {embedding!r} is not the name of one")
            if embedding == HASHED and data.get("hashed_words") != HASHED_WORDS:
                raise ValueError("not a router this version wrote")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApprenticeError(f"{where}: {exc}; fit one with "
                                  "`apprentice serve RECIPE.yaml --fit-router`") from None
        if embedding == HASHED:
            return cls(weights, bias)
        embedder = load_prompt_embedder(embedding, f"{where} (fitted with routing.embedding {embedding!r})")
        dimensions = len(embedder([""])[0])  # one text through the model: it works, and it is warm
        if dimensions != len(weights) - BASE_FEATURES:
            raise ApprenticeError(
                f"{where}: fitted on {len(weights) - BASE_FEATURES}-number embeddings, but {embedding!r} gives "
                f"{dimensions} here; refit with `apprentice serve RECIPE.yaml --fit-router`")
        return cls(weights, bias, embedding, embedder)


def curve(scores: list[float], agree: list[bool], steps: int = 10) -> list[tuple[float, float]]:
    """(routed share, quality) when the lowest-scored requests go to the teacher: the eval cascade's curve."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    points = []
    for step in range(steps + 1):
        routed = round(len(order) * step / steps)
        kept = sum(agree[i] for i in order[routed:])
        points.append((routed / len(order), (routed + kept) / len(order)))
    return points


def _fitted(train: list[Pair], vectors: list[list[float]], embedding: str,
            embedder: Embedder | None) -> LearnedRouter:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000, C=1.0)
    model.fit([features(p.prompt, p.answer, p.confidence, v) for p, v in zip(train, vectors)],
              [p.agree for p in train])
    return LearnedRouter([float(w) for w in model.coef_[0]], float(model.intercept_[0]), embedding, embedder)


def fit(log_dir: Path, embedding: str = HASHED) -> tuple[LearnedRouter, dict[str, Any]]:
    """Fit on the shadow comparisons outside the held-out share; report the routers on the held-out ones. With a
    model `embedding`, a hashed-words router is fitted and reported beside it, and the model's is returned."""
    pairs = shadow_pairs(log_dir)
    train = [pair for pair in pairs if not held_out(pair)]
    test = [pair for pair in pairs if held_out(pair)]
    if len(train) < MIN_PAIRS or len({pair.agree for pair in train}) < 2 or not test:
        raise ApprenticeError(
            f"{log_dir}: {len(pairs)} shadow comparisons with the student's confidence ({len(train)} to fit, "
            f"{len(test)} held out); a learned router needs at least {MIN_PAIRS} to fit, both agreements and "
            "disagreements among them, and some held out: serve longer with routing.shadow set")
    agree = [p.agree for p in test]
    embedders: dict[str, Embedder | None] = {HASHED: None}
    if embedding != HASHED:
        embedders[embedding] = load_prompt_embedder(embedding, "serve.routing.embedding")
    report: dict[str, Any] = {
        "pairs": len(pairs), "fitted_on": len(train), "held_out": len(test),
        "held_out_agreement": sum(agree) / len(agree), "embedding": embedding,
        "confidence": curve([p.confidence for p in test], agree), "routers": {},
    }
    fitted = {}
    for name, embedder in embedders.items():
        vectors = prompt_vectors([p.prompt for p in train + test], embedder)
        fitted[name] = router = _fitted(train, vectors[:len(train)], name, embedder)
        scores = [router.agreement(p.prompt, p.answer, p.confidence, v) for p, v in zip(test, vectors[len(train):])]
        report["routers"][name] = curve(scores, agree)
    report["learned"] = report["routers"][embedding]
    return fitted[embedding], report
