"""Answer-level metrics (each returns a score in [0, 1]) and 95 % confidence intervals (Wilson or BCa).

A metric takes (answer, reference) and, for `verifier`, the golden item. References are strings; for
`regex` the reference is the pattern, for `json_schema` a JSON Schema (a mapping or its JSON text), for
`json_match` a JSON value (or its text) compared after parsing, so key order and spacing do not matter.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Callable, NamedTuple, Sequence

from apprentice.errors import RecipeError
from apprentice.text import answer_words, fold_answer, rouge_l_words
from quality_checks.structured import extract_json_text, last_number, parse_number

from .config import METRIC_NAMES
from .instructions import instruction


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


def number(answer: str, reference: Any) -> float:
    """The last number in the answer equals the reference number (1e-6 relative or absolute): the factory's
    `reference` check in `number` mode, the GSM8K convention ("… so the answer is 42")."""
    expected, got = parse_number(str(reference).strip()), last_number(answer)
    if expected is None:
        raise RecipeError(f"metric number: the reference {str(reference)[:40]!r} is not a number; "
                          "fix the golden line or give it another metric")
    return float(got is not None and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-6))


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
    "instruction": instruction,
    "number": number,
    # Filled in by the runner, not from (answer, reference) alone:
    "verifier": lambda answer, reference: 0.0,
    "judge": lambda answer, reference: 0.0,
}
assert set(METRICS) == set(METRIC_NAMES), "eval/config.py METRIC_NAMES must list every metric"
NEEDS_REFERENCE = {"exact", "normalized", "token_f1", "rouge_l", "regex", "json_schema", "json_match", "instruction",
                   "number"}
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
# Every interval is 95 %. Which method made it is kept beside it (results.json `interval`) and printed.
Z95 = 1.959963984540054  # the normal quantile at 0.975
INTERVAL_METHODS = {
    "wilson": "Wilson score interval (every value 0 or 1: a proportion)",
    "bca": "BCa bootstrap of the mean (graded values)",
    "paired bca": "BCa bootstrap of the ratio of means, items resampled in pairs",
    "percentile": "percentile bootstrap (BCa undefined: every resample gives the same value)",
    "paired percentile": "percentile bootstrap of the ratio, items in pairs (BCa undefined)",
    "mover wilson": "MOVER-R ratio of the two Wilson intervals (pass/fail scores where every paired resample gives "
                    "the same ratio, e.g. a student with none right; pairing ignored, so it errs wide)",
    "none": "no interval (no values, or the ratio is undefined)",
}


class Interval(NamedTuple):
    value: float
    low: float
    high: float
    method: str  # a key of INTERVAL_METHODS


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: 0 of 60 gives [0, 6.0 %], not the bootstrap's [0, 0]."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], *, resamples: int = 1000, seed: int = 0) -> Interval:
    """The mean with its 95 % interval: Wilson when every value is 0 or 1, else a BCa bootstrap.

    The values decide, not the metric's name: `overall` over pass/fail metrics, or a verifier returning
    booleans, is a proportion. Wilson rather than Clopper–Pearson: its coverage is close to 95 % on
    average at every n, where Clopper–Pearson's guaranteed ≥ 95 % makes it wider than it needs to be.
    """
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), "none")
    mean = float(data.mean())
    if _pass_fail(data):
        return Interval(mean, *wilson(float(data.sum()), int(data.size)), "wilson")
    return _bootstrap((data,), _mean, mean, resamples, seed, paired=False)


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], *, resamples: int = 1000,
                   seed: int = 0) -> Interval:
    """(mean of numerator) ÷ (mean of denominator), items resampled in pairs: retention = student ÷ teacher."""
    import numpy as np

    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.size == 0 or b.sum() == 0:
        return Interval(float("nan"), float("nan"), float("nan"), "none")
    found = _bootstrap((a, b), _ratio, float(a.mean() / b.mean()), resamples, seed, paired=True)
    if found.method == "paired bca" or not (_pass_fail(a) and _pass_fail(b)):
        return found
    # 0 of 60 against 48 of 60: every resample's ratio is 0, and [0, 0] would claim certainty; the
    # Wilson intervals of the two proportions still say how large the ratio could be.
    low, high = mover_ratio(float(a.mean()), wilson(float(a.sum()), a.size), float(b.mean()), wilson(float(b.sum()), b.size))
    return Interval(found.value, low, high, "mover wilson")


def mover_ratio(top: float, top_ci: tuple[float, float], bottom: float, bottom_ci: tuple[float, float]) -> tuple[float, float]:
    """MOVER-R (Newcombe 2016, Stat Methods Med Res 25:1774): an interval for top ÷ bottom from the
    intervals of the two, as if independent (for paired scores that correlate positively, wider)."""
    (l1, u1), (l2, u2) = top_ci, bottom_ci
    product = top * bottom
    below = u2 * (2 * bottom - u2)
    above = l2 * (2 * bottom - l2)
    low = (product - math.sqrt(max(0.0, product**2 - l1 * u2 * (2 * top - l1) * (2 * bottom - u2)))) / below \
        if below > 0 else 0.0
    high = (product + math.sqrt(max(0.0, product**2 - u1 * l2 * (2 * top - u1) * (2 * bottom - l2)))) / above \
        if above > 0 else math.inf
    return max(0.0, low), high


def _pass_fail(data: Any) -> bool:
    import numpy as np

    return bool(np.isin(data, (0.0, 1.0)).all())


def _mean(data: Any, axis: int = -1) -> Any:
    return data.mean(axis=axis)


def _ratio(a: Any, b: Any, axis: int = -1) -> Any:
    import numpy as np

    den = b.mean(axis=axis)
    return np.where(den > 0, a.mean(axis=axis) / np.where(den > 0, den, 1.0), np.nan)


def _bootstrap(data: tuple[Any, ...], statistic: Callable[..., Any], value: float, resamples: int, seed: int, *,
               paired: bool) -> Interval:
    """scipy's BCa bootstrap; where BCa is undefined (every resample equal, or a resample's ratio has a
    zero denominator), the percentile interval of the same resamples, and the label says so."""
    import warnings

    import numpy as np
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns, then returns nan, where BCa is undefined
        result = stats.bootstrap(data, statistic, n_resamples=resamples, method="BCa", paired=paired,
                                 vectorized=True, rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    prefix = "paired " if paired else ""
    if math.isfinite(low) and math.isfinite(high):
        return Interval(value, low, high, prefix + "bca")
    draws = result.bootstrap_distribution[np.isfinite(result.bootstrap_distribution)]
    if draws.size == 0:
        return Interval(value, float("nan"), float("nan"), "none")
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(value, float(low), float(high), prefix + "percentile")
