"""Prices in USD per 1M tokens (input, output), list prices of the providers' standard tier.

Dated model names (gpt-4o-2024-08-06, claude-sonnet-4-5-20250929) match their family by the longest
prefix. A recipe's `teacher.price` overrides this table; local teachers cost nothing.
"""
from __future__ import annotations

PRICES: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    # Anthropic
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-haiku": (0.25, 1.25),
}


def lookup(model: str) -> tuple[float, float] | None:
    best: str | None = None
    for name in PRICES:
        if model.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return PRICES[best] if best else None


class Pricer:
    def __init__(self, per_million: tuple[float, float] | None) -> None:
        self.known = per_million is not None
        input_price, output_price = per_million or (0.0, 0.0)
        self.input = input_price / 1e6
        self.output = output_price / 1e6

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens * self.input + output_tokens * self.output
