"""Quality checks: each takes a Sample and returns a Verdict with a reason when it fails.

Built-in checks: empty, truncated, refusal, length, regex (rules); json, reference (structured);
exact_dup, near_dup, contamination (dedup); semantic_dup (sentence embeddings); verifier (a user
function); judge (an LLM scores against a rubric). semantic_dup and judge are async checks (`averdict`),
awaited by the pipeline.
"""
from .base import (
    PASS,
    AsyncCheck,
    Check,
    CheckConfigError,
    CheckOptions,
    Verdict,
    available,
    build_checks,
    check_fingerprint,
    parse_check_item,
    prime,
    register,
)

__all__ = [
    "PASS", "AsyncCheck", "Check", "CheckConfigError", "CheckOptions", "Verdict", "available", "build_checks",
    "check_fingerprint", "parse_check_item", "prime", "register",
]
