"""`routing.mode: learned`: a small classifier, fitted on the shadow log, that says how likely the student's answer
is to agree with the teacher's, from the student's confidence, the prompt's and the answer's lengths and a hashed
bag of the prompt's words. It is reported against confidence-only routing on held-out shadow comparisons: quality
(agreement with the teacher, routed requests counting as the teacher's own answer) at each routed share, the eval
cascade's curve.

Fitting needs scikit-learn (imported where it is used); serving reads the weights from JSON and needs nothing.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.errors import ApprenticeError
from apprentice.text import fold_text
from factory.served_log import iter_served

HASHED_WORDS = 64   # the prompt's words hashed into this many buckets (the "embedding": cheap and stable)
HELD_OUT = 0.2      # the share of comparisons kept out of the fit, chosen by the request id's hash
MIN_PAIRS = 20


@dataclass(slots=True)
class Pair:
    """One shadow comparison: the student's answer to a request, its confidence, and whether the teacher agreed."""

    id: str
    prompt: list[dict[str, str]]
    answer: str
    confidence: float
    agree: bool


def features(prompt: list[dict[str, str]], answer: str, confidence: float) -> list[float]:
    prompt_text = " ".join(message["content"] for message in prompt)
    words = fold_text(prompt_text).split()
    buckets = [0.0] * HASHED_WORDS
    for word in words:
        buckets[zlib.crc32(word.encode("utf-8")) % HASHED_WORDS] += 1.0
    norm = math.sqrt(sum(v * v for v in buckets)) or 1.0
    return [confidence, math.log1p(len(prompt_text)), math.log1p(len(answer))] + [v / norm for v in buckets]


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
    def __init__(self, weights: list[float], bias: float) -> None:
        self.weights = weights
        self.bias = bias

    def agreement(self, prompt: list[dict[str, str]], answer: str, confidence: float) -> float:
        """The probability that the teacher would give the same answer."""
        z = self.bias + sum(w * x for w, x in zip(self.weights, features(prompt, answer, confidence)))
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": "logistic", "hashed_words": HASHED_WORDS, "weights": self.weights,
                                    "bias": self.bias}), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "LearnedRouter":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("kind") != "logistic" or data.get("hashed_words") != HASHED_WORDS:
                raise ValueError("not a router this version wrote")
            return cls([float(w) for w in data["weights"]], float(data["bias"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApprenticeError(f"serve.routing.router: {path}: {exc}; fit one with "
                                  "`apprentice serve RECIPE.yaml --fit-router`") from None


def curve(scores: list[float], agree: list[bool], steps: int = 10) -> list[tuple[float, float]]:
    """(routed share, quality) when the lowest-scored requests go to the teacher: the eval cascade's curve."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    points = []
    for step in range(steps + 1):
        routed = round(len(order) * step / steps)
        kept = sum(agree[i] for i in order[routed:])
        points.append((routed / len(order), (routed + kept) / len(order)))
    return points


def fit(log_dir: Path) -> tuple[LearnedRouter, dict[str, Any]]:
    """Fit on the shadow comparisons outside the held-out share; report both routers on the held-out ones."""
    from sklearn.linear_model import LogisticRegression

    pairs = shadow_pairs(log_dir)
    train = [pair for pair in pairs if not held_out(pair)]
    test = [pair for pair in pairs if held_out(pair)]
    if len(train) < MIN_PAIRS or len({pair.agree for pair in train}) < 2 or not test:
        raise ApprenticeError(
            f"{log_dir}: {len(pairs)} shadow comparisons with the student's confidence ({len(train)} to fit, "
            f"{len(test)} held out); a learned router needs at least {MIN_PAIRS} to fit, both agreements and "
            "disagreements among them, and some held out: serve longer with routing.shadow set")
    model = LogisticRegression(max_iter=1000, C=1.0)
    model.fit([features(p.prompt, p.answer, p.confidence) for p in train], [p.agree for p in train])
    router = LearnedRouter([float(w) for w in model.coef_[0]], float(model.intercept_[0]))
    agree = [p.agree for p in test]
    report = {
        "pairs": len(pairs), "fitted_on": len(train), "held_out": len(test),
        "held_out_agreement": sum(agree) / len(agree),
        "confidence": curve([p.confidence for p in test], agree),
        "learned": curve([router.agreement(p.prompt, p.answer, p.confidence) for p in test], agree),
    }
    return router, report
