"""Quality checks: each takes a Sample and returns a Verdict with a reason when it fails."""
from .base import Check, Verdict, build_checks, register

__all__ = ["Check", "Verdict", "build_checks", "register"]
