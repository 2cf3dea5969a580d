"""Quality checks: each takes a Sample and returns a Verdict with a reason when it fails.

Built-in checks: empty, truncated, refusal, length, regex (rules); json, reference (structured);
exact_dup, near_dup, contamination (dedup); semantic_dup (sentence embeddings); verifier (a user
function); judge (an LLM scores against a rubric). Each check declares what it needs (`Check.awaits`,
`run_wide`, `teacher`); semantic_dup and judge await, and the engine awaits them.
"""
from .base import PASS, Check, Verdict, build_checks, prime
from .registry import CheckConfigError, CheckOptions, available, check_fingerprint, parse_check_item, register

__all__ = [
    "PASS", "Check", "CheckConfigError", "CheckOptions", "Verdict", "available", "build_checks",
    "check_fingerprint", "parse_check_item", "prime", "register",
]
