"""Answer-level metrics (each returns a score in [0, 1]) and bootstrap confidence intervals.

A metric takes (answer, reference) and, for `verifier`, the golden item. References are strings; for
`regex` the reference is the pattern, for `json_schema` a JSON Schema (a mapping or its JSON text), for
`json_match` a JSON value (or its text) compared after parsing, so key order and spacing do not matter.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Callable, Sequence

from apprentice.errors import RecipeError
from apprentice.text import answer_words, fold_answer, rouge_l_words
from quality_checks.structured import extract_json_text

from .config import METRIC_NAMES


def exact(answer: str, reference: Any) -> float:
    return float(answer.strip() == str(reference).strip())


def normalized(answer: str, reference: Any) -> float:
    """Equal after `fold_answer`: the factory's `reference` check in `normalized` mode, the same rule."""
    return float(fold_answer(answer) == fold_answer(str(reference)))


def token_f1(answer: str, reference: Any) -> float:
    pred, gold = answer_words(answer), answer_words(str(reference))
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: Any) -> float:
    """ROUGE-L F1 over `answer_words` (longest common subsequence)."""
    return rouge_l_words(answer_words(answer), answer_words(str(reference)))


def regex(answer: str, reference: Any) -> float:
    return float(re.search(str(reference), answer, re.DOTALL) is not None)


def parse_json(answer: str) -> Any:
    """The answer as JSON: a ```json fenced block if there is one, else the whole text; raises ValueError."""
    return json.loads(extract_json_text(answer))


def json_valid(answer: str, reference: Any = None) -> float:
    try:
        parse_json(answer)
    except ValueError:
        return 0.0
    return 1.0


def json_schema(answer: str, reference: Any) -> float:
    import jsonschema

    try:
        value = parse_json(answer)
    except ValueError:
        return 0.0
    schema = json.loads(reference) if isinstance(reference, str) else reference
    return float(jsonschema.Draft202012Validator(schema).is_valid(value))


def json_match(answer: str, reference: Any) -> float:
    try:
        value = parse_json(answer)
    except ValueError:
        return 0.0
    expected = json.loads(reference) if isinstance(reference, str) else reference
    return float(value == expected)


METRICS: dict[str, Callable[[str, Any], float]] = {
    "exact": exact,
    "normalized": normalized,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "regex": regex,
    "json_valid": json_valid,
    "json_schema": json_schema,
    "json_match": json_match,
    # Filled in by the runner, not from (answer, reference) alone:
    "verifier": lambda answer, reference: 0.0,
    "judge": lambda answer, reference: 0.0,
}
assert set(METRICS) == set(METRIC_NAMES), "eval/config.py METRIC_NAMES must list every metric"
NEEDS_REFERENCE = {"exact", "normalized", "token_f1", "rouge_l", "regex", "json_schema", "json_match"}
SPECIAL = {"verifier", "judge"}


def load_function(spec: str, key: str) -> Callable[..., Any]:
    """`package.module:function` → the function; the error names the recipe key and the fix."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"{key}: {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"{key}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise RecipeError(f"{key}: {module_name} has no function {attr!r}")
    return function


def as_score(value: Any) -> float:
    """A verifier's result (bool, number, or an object with .passed / .score) as a score in [0, 1]."""
    if hasattr(value, "passed"):
        score = getattr(value, "score", None)
        return float(score) if score is not None else float(bool(value.passed))
    return float(value)


# ---- confidence intervals ---------------------------------------------------------------------------
def bootstrap_mean(values: Sequence[float], *, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile 95 % interval of the mean over `resamples` resamples."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_ratio(numerator: Sequence[float], denominator: Sequence[float], *, resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(ratio of means, low, high) with items resampled in pairs: retention = student ÷ teacher."""
    import numpy as np

    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.size == 0 or b.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    den = b[idx].mean(axis=1)
    ratios = np.divide(a[idx].mean(axis=1), den, out=np.full(resamples, np.nan), where=den > 0)
    ratios = ratios[~np.isnan(ratios)]
    return float(a.mean() / b.mean()), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))
