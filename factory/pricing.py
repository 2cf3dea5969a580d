"""What a request costs: list prices per 1M tokens from a maintained table, or the recipe's `teacher.price`.

The table is pydantic's `genai-prices` (https://github.com/pydantic/genai-prices): input, output, cached
input (prompt-cache reads) and cache writes for each model, dated names matched to their family
(gpt-4o-2024-08-06 → gpt-4o, claude-sonnet-4-5-20250929 → claude-sonnet-4-5), and the long-context tiers
(Anthropic's dearer rates above 200k input tokens). It reads the snapshot bundled in its wheel
(`genai_prices/data.py`); it goes to the network only when a caller starts its `UpdatePrices` background
task, which Apprentice never does. So a run prices offline, and the same package version gives the same
prices (it is pinned below 0.3 in pyproject.toml). The table's standard prices are used; the Batch APIs'
price is `teacher.batch.discount` times them (see factory/run.py). Local teachers cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from apprentice.errors import RecipeError
from apprentice.responses import TeacherResponse

from .recipe import IN_PROCESS, TeacherConfig

# A cache write's price as a share of the input price when a price says none: Anthropic's 5-minute write.
CACHE_WRITE_SHARE = 1.25


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per 1M tokens. `tiers`: (input tokens, the rates of a request with more input than that), ascending."""

    input: float
    output: float
    cached_input: float
    cache_write: float
    tiers: tuple[tuple[int, "Rates"], ...] = ()

    @classmethod
    def of(cls, input: float, output: float, cached_input: float | None = None,
           cache_write: float | None = None) -> "Rates":
        """Missing cache prices are the dear ones, so a cost is never under-counted: a cached token at the
        input price, a written one at 1.25 × the input price."""
        return cls(input, output, input if cached_input is None else cached_input,
                   input * CACHE_WRITE_SHARE if cache_write is None else cache_write)

    def scaled(self, factor: float) -> "Rates":
        return Rates(self.input * factor, self.output * factor, self.cached_input * factor,
                     self.cache_write * factor, tuple((start, tier.scaled(factor)) for start, tier in self.tiers))

    def for_input(self, input_tokens: int) -> "Rates":
        rates = self
        for start, tier in self.tiers:
            if input_tokens > start:
                rates = tier
        return rates


def lookup(model: str, provider: str | None = None) -> Rates | None:
    """The table's standard list prices of `model` at `provider` (openai, anthropic; None: by the name)."""
    from genai_prices import data_snapshot  # 0.3 s to import its table: only when a run needs a price

    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None
    return _rates(info.get_prices(datetime.now(timezone.utc)))


def _rates(price: Any) -> Rates | None:
    """A genai-prices ModelPrice (each price a Decimal, a TieredPrices or None) as Rates with their tiers."""
    keys = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    values = [getattr(price, key) for key in keys]
    if values[0] is None or values[1] is None:
        return None  # priced by something else (images, seconds of audio)

    def at(value: Any, input_tokens: int) -> float | None:
        """The price of one key for a request with more than `input_tokens` input tokens (-1: the base)."""
        if value is None or isinstance(value, Decimal):
            return None if value is None else float(value)
        chosen = value.base
        for tier in value.tiers:
            if input_tokens >= tier.start:
                chosen = tier.price
        return float(chosen)

    def rates_at(input_tokens: int) -> Rates:
        fresh, output, cached, written = (at(value, input_tokens) for value in values)
        # The table lists a cache price where the provider bills one: no write price, no write premium.
        return Rates.of(fresh, output, cached, fresh if written is None else written)

    starts = sorted({tier.start for value in values if value is not None and not isinstance(value, Decimal)
                     for tier in value.tiers})
    return replace(rates_at(-1), tiers=tuple((start, rates_at(start)) for start in starts))


class Pricer:
    """The cost of a request at one set of rates; with none (an unknown model), everything costs 0."""

    def __init__(self, rates: Rates | None, scale: float = 1.0) -> None:
        self.known = rates is not None
        self.rates = rates.scaled(scale) if rates is not None else None

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
             cache_write_tokens: int = 0) -> float:
        """`input_tokens` counts every input token, the cached and written ones among them."""
        if self.rates is None:
            return 0.0
        rates = self.rates.for_input(input_tokens)
        fresh = max(0, input_tokens - cached_input_tokens - cache_write_tokens)
        return (fresh * rates.input + cached_input_tokens * rates.cached_input
                + cache_write_tokens * rates.cache_write + output_tokens * rates.output) / 1e6

    def cost_of(self, response: TeacherResponse) -> float:
        return self.cost(response.input_tokens, response.output_tokens, response.cached_input_tokens,
                         response.cache_write_tokens)

    def worst(self, input_tokens: int, output_tokens: int) -> float:
        """The most a request of these sizes can cost, for the budget's reservation: every input token at
        the dearer of the input and the cache-write price."""
        if self.rates is None:
            return 0.0
        rates = self.rates.for_input(input_tokens)
        return (input_tokens * max(rates.input, rates.cache_write) + output_tokens * rates.output) / 1e6


def pricer_for(teacher: TeacherConfig, budget_usd: float | None, key: str = "factory.teacher") -> tuple[Pricer, str | None]:
    """The pricer of a model the run pays (`key` is its place in the recipe), and a warning when its price is
    unknown. Raises RecipeError when a budget is set and no price is known: a budget needs a price."""
    # The Batch APIs bill a share of the list price (half, for both providers).
    scale = teacher.batch.discount if teacher.mode == "batch" else 1.0
    if teacher.price is not None:
        price = teacher.price
        return Pricer(Rates.of(price.input, price.output, price.cached_input, price.cache_write), scale), None
    if teacher.provider in IN_PROCESS:
        return Pricer(Rates.of(0.0, 0.0, 0.0, 0.0)), None
    rates = lookup(teacher.model, teacher.provider)
    warning = None
    if rates is None:
        if budget_usd is not None:
            raise RecipeError(
                f"factory.budget_usd is set but no price is known for model {teacher.model!r}: "
                f"set {key}.price: {{input: USD per 1M, output: USD per 1M}}"
            )
        if teacher.base_url is None:
            warning = f"no price known for {teacher.model!r}; cost is shown as $0. Set {key}.price to track it."
    return Pricer(rates, scale), warning


def usd(amount: float) -> str:
    """Dollars to the cent, or to the millionth below a cent (a small run's cost is not $0.00); $0 for nothing."""
    if amount == 0:
        return "$0"
    return f"${amount:,.2f}" if abs(amount) >= 0.01 else f"${amount:.6f}"
