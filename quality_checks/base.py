"""The Check protocol, the Verdict it returns, and the registry that recipes name checks from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from factory.records import Sample


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str | None = None
    score: float | None = None


PASS = Verdict(True)


class Check(Protocol):
    name: str

    def __call__(self, sample: "Sample") -> Verdict: ...


_REGISTRY: dict[str, Callable[[], Check]] = {}


def register(name: str) -> Callable[[Callable[[], Check]], Callable[[], Check]]:
    def wrap(factory: Callable[[], Check]) -> Callable[[], Check]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    from . import rules  # noqa: F401  (registers the built-in checks)

    return sorted(_REGISTRY)


def build_checks(names: list[str]) -> list[Check]:
    known = available()
    unknown = [name for name in names if name not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; available: {', '.join(known)}")
    return [_REGISTRY[name]() for name in names]
