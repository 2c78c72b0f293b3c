"""The price book: litellm's packaged price map plus per-model YAML overrides; costs and cost multiples.

A cost is exact for the usage a provider reports: cache reads and cache writes (Anthropic's 5-minute and
1-hour TTLs) at their own prices, reasoning tokens as output (or at their own price where a model has
one), and the whole request at a tier's prices once its prompt passes the tier's threshold (Gemini and
Claude above 200k tokens, GPT above 272k), the way the providers bill and litellm's map records it.
litellm's map is read as a JSON file found next to its package, without importing litellm's runtime
(which costs seconds of start-up and ~100 MB of memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from proxy.config.models import ModelConfig, PriceConfig, PriceTierConfig
from proxy.config.price_map import lookup_names, packaged_price_map
from proxy.wire.usage import TokenUsage

# litellm's tier keys, e.g. `input_cost_per_token_above_200k_tokens`; service-tier (`_priority`, `_flex`) and
# batch (`_batches`) variants end differently and are not matched.
_TIER_KEY = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|cache_creation_input_token_cost"
    r"|cache_creation_input_token_cost_above_1hr)_above_(\d+)(k?)_tokens$"
)
_TIER_FIELD = {
    "input_cost_per_token": "input_per_token",
    "output_cost_per_token": "output_per_token",
    "cache_read_input_token_cost": "cache_read_per_token",
    "cache_creation_input_token_cost": "cache_write_per_token",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h_per_token",
}


@dataclass(frozen=True, slots=True)
class TokenRates:
    """USD per token of each kind; None means "priced as" the kind named beside it."""

    input_per_token: float
    output_per_token: float
    cache_read_per_token: float | None = None  # None: as input
    cache_write_per_token: float | None = None  # None: as input (the 5-minute TTL)
    cache_write_1h_per_token: float | None = None  # None: as a 5-minute write
    reasoning_per_token: float | None = None  # None: as output


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Rates for every token of a request whose prompt has more than `above_input_tokens` tokens."""

    above_input_tokens: int
    rates: TokenRates


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """A request's cost in USD by kind of token; `total` is what the provider bills."""

    input: float = 0.0  # uncached prompt tokens
    cached_input: float = 0.0  # cache reads
    cache_write: float = 0.0  # cache writes, both TTLs
    output: float = 0.0  # generated tokens other than reasoning
    reasoning: float = 0.0

    @property
    def total(self) -> float:
        return self.input + self.cached_input + self.cache_write + self.output + self.reasoning


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_per_token: float
    output_per_token: float
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    source: str = "price book"
    cache_read_per_token: float | None = None
    cache_write_per_token: float | None = None
    cache_write_1h_per_token: float | None = None
    reasoning_per_token: float | None = None
    tiers: tuple[PriceTier, ...] = ()  # ascending thresholds

    def rates(self, input_tokens: int) -> TokenRates:
        """The rates that apply to a request with this many prompt tokens (the highest tier it passes)."""
        rates = TokenRates(
            self.input_per_token,
            self.output_per_token,
            self.cache_read_per_token,
            self.cache_write_per_token,
            self.cache_write_1h_per_token,
            self.reasoning_per_token,
        )
        for tier in self.tiers:
            if input_tokens > tier.above_input_tokens:
                rates = tier.rates
        return rates

    def breakdown(self, usage: TokenUsage) -> CostBreakdown:
        r = self.rates(usage.input)
        read = r.input_per_token if r.cache_read_per_token is None else r.cache_read_per_token
        write = r.input_per_token if r.cache_write_per_token is None else r.cache_write_per_token
        write_1h = write if r.cache_write_1h_per_token is None else r.cache_write_1h_per_token
        reasoning = r.output_per_token if r.reasoning_per_token is None else r.reasoning_per_token
        cache_write = min(usage.cache_write, max(0, usage.input - usage.cached_input))
        write_1h_tokens = min(usage.cache_write_1h, cache_write)
        uncached = max(0, usage.input - usage.cached_input - cache_write)
        reasoning_tokens = min(usage.reasoning, usage.output)
        return CostBreakdown(
            input=uncached * r.input_per_token,
            cached_input=min(usage.cached_input, usage.input) * read,
            cache_write=(cache_write - write_1h_tokens) * write + write_1h_tokens * write_1h,
            output=(usage.output - reasoning_tokens) * r.output_per_token,
            reasoning=reasoning_tokens * reasoning,
        )

    def cost(self, usage: TokenUsage | int, output_tokens: int = 0) -> float:
        """USD for a request's usage; `cost(input_tokens, output_tokens)` prices plain (uncached) tokens."""
        if isinstance(usage, int):
            if not self.tiers:  # the hot path: one flat rate per kind
                return usage * self.input_per_token + output_tokens * self.output_per_token
            r = self.rates(usage)
            return usage * r.input_per_token + output_tokens * r.output_per_token
        if not (self.tiers or usage.cached_input or usage.cache_write or usage.reasoning):
            return usage.input * self.input_per_token + usage.output * self.output_per_token
        return self.breakdown(usage).total

    def worst_case_cost(self, input_tokens: int, output_tokens: int, cache_writes: bool = False) -> float:
        """The most a request of this shape can cost: what a budget reserves. With `cache_writes` (the
        request marks `cache_control`), every prompt token may be written to the cache at its dearer price."""
        r = self.rates(input_tokens)
        per_input = r.input_per_token
        if cache_writes:
            write = r.input_per_token if r.cache_write_per_token is None else r.cache_write_per_token
            write_1h = write if r.cache_write_1h_per_token is None else r.cache_write_1h_per_token
            per_input = max(per_input, write, write_1h)
        per_output = max(r.output_per_token, r.reasoning_per_token or 0.0)
        return input_tokens * per_input + output_tokens * per_output


UNKNOWN_PRICE = ModelPrice(0.0, 0.0, source="unknown")


def _rate(entry: dict, key: str) -> float | None:
    v = entry.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _entry_tiers(entry: dict, flat: TokenRates) -> tuple[PriceTier, ...]:
    """A map entry's tiers; a kind of token a tier does not price keeps its flat rate (litellm's reading)."""
    found: dict[int, dict[str, float]] = {}
    for key, value in entry.items():
        m = _TIER_KEY.match(key)
        if m is None or _rate(entry, key) is None:
            continue
        threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
        found.setdefault(threshold, {})[_TIER_FIELD[m.group(1)]] = float(value)
    return tuple(PriceTier(t, replace(flat, **found[t])) for t in sorted(found))


def _entry_price(entry: dict) -> ModelPrice:
    flat = TokenRates(
        _rate(entry, "input_cost_per_token") or 0.0,
        _rate(entry, "output_cost_per_token") or 0.0,
        _rate(entry, "cache_read_input_token_cost"),
        _rate(entry, "cache_creation_input_token_cost"),
        _rate(entry, "cache_creation_input_token_cost_above_1hr"),
        _rate(entry, "output_cost_per_reasoning_token"),
    )
    return ModelPrice(
        flat.input_per_token,
        flat.output_per_token,
        entry.get("max_input_tokens"),
        entry.get("max_output_tokens") or entry.get("max_tokens"),
        cache_read_per_token=flat.cache_read_per_token,
        cache_write_per_token=flat.cache_write_per_token,
        cache_write_1h_per_token=flat.cache_write_1h_per_token,
        reasoning_per_token=flat.reasoning_per_token,
        tiers=_entry_tiers(entry, flat),
    )


def _per_token(per_mtok: float | None) -> float | None:
    return None if per_mtok is None else per_mtok / 1e6


def _config_rates(cfg: PriceConfig | PriceTierConfig, base: TokenRates | None = None) -> TokenRates:
    """A YAML price's rates; a tier's missing fields keep the flat price's."""

    def pick(value: float | None, inherited: float | None) -> float | None:
        return _per_token(value) if value is not None else inherited

    b = base or TokenRates(0.0, 0.0)
    return TokenRates(
        pick(cfg.input_per_mtok, b.input_per_token) or 0.0,
        pick(cfg.output_per_mtok, b.output_per_token) or 0.0,
        pick(cfg.cached_input_per_mtok, b.cache_read_per_token),
        pick(cfg.cache_write_per_mtok, b.cache_write_per_token),
        pick(cfg.cache_write_1h_per_mtok, b.cache_write_1h_per_token),
        pick(cfg.reasoning_per_mtok, b.reasoning_per_token),
    )


def config_price(
    cfg: PriceConfig, max_input_tokens: int | None = None, max_output_tokens: int | None = None
) -> ModelPrice:
    """The price a policy file's `price:` block sets."""
    flat = _config_rates(cfg)
    return ModelPrice(
        flat.input_per_token,
        flat.output_per_token,
        max_input_tokens,
        max_output_tokens,
        source="policy file",
        cache_read_per_token=flat.cache_read_per_token,
        cache_write_per_token=flat.cache_write_per_token,
        cache_write_1h_per_token=flat.cache_write_1h_per_token,
        reasoning_per_token=flat.reasoning_per_token,
        tiers=tuple(PriceTier(t.above_input_tokens, _config_rates(t, flat)) for t in cfg.tiers),
    )


class PriceBook:
    """Prices of the configured models, by the name clients send."""

    def __init__(self, models: dict[str, ModelConfig], price_map: dict[str, dict] | None = None):
        self._map = packaged_price_map() if price_map is None else price_map
        self._prices: dict[str, ModelPrice] = {name: self._resolve(name, cfg) for name, cfg in models.items()}

    def _resolve(self, name: str, cfg: ModelConfig) -> ModelPrice:
        entry = self.lookup(cfg.upstream_model or name, cfg.provider) or self.lookup(name, cfg.provider)
        if cfg.price is not None:
            return config_price(
                cfg.price,
                cfg.max_input_tokens or (entry.max_input_tokens if entry else None),
                cfg.max_output_tokens or (entry.max_output_tokens if entry else None),
            )
        if entry is None:
            return ModelPrice(0.0, 0.0, cfg.max_input_tokens, cfg.max_output_tokens, source="unknown")
        return replace(
            entry,
            max_input_tokens=cfg.max_input_tokens or entry.max_input_tokens,
            max_output_tokens=cfg.max_output_tokens or entry.max_output_tokens,
        )

    def lookup(self, name: str, provider: str = "openai") -> ModelPrice | None:
        """Price of any model in the packaged map (not only configured ones)."""
        for key in lookup_names(name, provider):
            entry = self._map.get(key)
            if entry and ("input_cost_per_token" in entry or "output_cost_per_token" in entry):
                return _entry_price(entry)
        return None

    def price(self, model: str) -> ModelPrice:
        return self._prices.get(model, UNKNOWN_PRICE)

    def is_known(self, model: str) -> bool:
        return self.price(model).source != "unknown"

    def cost(self, model: str, usage: TokenUsage | int, output_tokens: int = 0) -> float:
        """USD for `usage` on `model`: `cost(model, TokenUsage(...))` is exact for cached, cache-write and
        reasoning tokens; `cost(model, input_tokens, output_tokens)` prices plain tokens."""
        return self.price(model).cost(usage, output_tokens)

    def cost_multiple(self, expensive: str, cheap: str, input_tokens: int = 1000, output_tokens: int = 250) -> float:
        """How many times `expensive` costs `cheap` for a request of this shape (inf if `cheap` is free)."""
        a = self.cost(expensive, input_tokens, output_tokens)
        b = self.cost(cheap, input_tokens, output_tokens)
        if b == 0.0:
            return float("inf") if a > 0 else 1.0
        return a / b
