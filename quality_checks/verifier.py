"""`verifier`: a user function decides, for checks no rule can express (run the code, call a solver).

    checks:
      - {name: verifier, function: "my_project.checks:compiles", args: {timeout_s: 2}}

The function is called as `function(sample, **args)` and returns a Verdict, a bool, or
(bool, reason). It is imported when the run starts, so a typo fails before anything is paid.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from .base import PASS, Check, Verdict
from .registry import CheckConfigError, CheckOptions, register

if TYPE_CHECKING:
    from factory.records import Sample


class VerifierOptions(CheckOptions):
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", description='"package.module:function"')
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the function")


def import_function(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error, said plainly
        raise CheckConfigError(
            f"cannot import module {module_name!r} for {spec!r}: {type(exc).__name__}: {exc} "
            "(is the package installed, or the current directory on PYTHONPATH?)",
            "function",
        ) from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CheckConfigError(f"module {module_name!r} has no attribute {attr!r}", "function") from None
    if not callable(target):
        raise CheckConfigError(f"{spec!r} is not callable", "function")
    return target


@register("verifier", VerifierOptions)
class Verifier(Check):
    name = "verifier"

    def __init__(self, options: VerifierOptions) -> None:
        self.function = import_function(options.function)
        self.args = options.args

    def __call__(self, sample: "Sample") -> Verdict:
        try:
            result = self.function(sample, **self.args)
        except Exception as exc:  # noqa: BLE001 - failures are data: the sample is rejected with the error
            return Verdict(False, f"verifier raised {type(exc).__name__}: {str(exc)[:200]}")
        if isinstance(result, Verdict):
            return result if result.passed or result.reason else Verdict(False, "verifier rejected", result.score)
        if isinstance(result, bool):
            return PASS if result else Verdict(False, "verifier returned False")
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
            return PASS if result[0] else Verdict(False, str(result[1] or "verifier returned False"))
        return Verdict(False, f"verifier returned {type(result).__name__}, expected a Verdict or a bool")
