"""The price book: litellm's packaged price map plus per-model YAML overrides; costs and cost multiples.

litellm's map is read as a JSON file found next to its package, without importing litellm's runtime
(which costs seconds of start-up and ~100 MB of memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config.models import ModelConfig
from proxy.config.price_map import lookup_names, packaged_price_map


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input_per_token: float
    output_per_token: float
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    source: str = "price book"

    def cost(self, input_tokens: int, output_tokens: int = 0) -> float:
        return input_tokens * self.input_per_token + output_tokens * self.output_per_token


UNKNOWN_PRICE = ModelPrice(0.0, 0.0, source="unknown")


class PriceBook:
    """Prices of the configured models, by the name clients send."""

    def __init__(self, models: dict[str, ModelConfig], price_map: dict[str, dict] | None = None):
        self._map = packaged_price_map() if price_map is None else price_map
        self._prices: dict[str, ModelPrice] = {name: self._resolve(name, cfg) for name, cfg in models.items()}

    def _resolve(self, name: str, cfg: ModelConfig) -> ModelPrice:
        entry = self.lookup(cfg.upstream_model or name, cfg.provider) or self.lookup(name, cfg.provider)
        if cfg.price is not None:
            return ModelPrice(
                cfg.price.input_per_mtok / 1e6,
                cfg.price.output_per_mtok / 1e6,
                cfg.max_input_tokens or (entry.max_input_tokens if entry else None),
                cfg.max_output_tokens or (entry.max_output_tokens if entry else None),
                source="policy file",
            )
        if entry is None:
            return ModelPrice(0.0, 0.0, cfg.max_input_tokens, cfg.max_output_tokens, source="unknown")
        return ModelPrice(
            entry.input_per_token,
            entry.output_per_token,
            cfg.max_input_tokens or entry.max_input_tokens,
            cfg.max_output_tokens or entry.max_output_tokens,
        )

    def lookup(self, name: str, provider: str = "openai") -> ModelPrice | None:
        """Price of any model in the packaged map (not only configured ones)."""
        for key in lookup_names(name, provider):
            entry = self._map.get(key)
            if entry and ("input_cost_per_token" in entry or "output_cost_per_token" in entry):
                return ModelPrice(
                    float(entry.get("input_cost_per_token") or 0.0),
                    float(entry.get("output_cost_per_token") or 0.0),
                    entry.get("max_input_tokens"),
                    entry.get("max_output_tokens") or entry.get("max_tokens"),
                )
        return None

    def price(self, model: str) -> ModelPrice:
        return self._prices.get(model, UNKNOWN_PRICE)

    def is_known(self, model: str) -> bool:
        return self.price(model).source != "unknown"

    def cost(self, model: str, input_tokens: int, output_tokens: int = 0) -> float:
        return self.price(model).cost(input_tokens, output_tokens)

    def cost_multiple(self, expensive: str, cheap: str, input_tokens: int = 1000, output_tokens: int = 250) -> float:
        """How many times `expensive` costs `cheap` for a request of this shape (inf if `cheap` is free)."""
        a = self.cost(expensive, input_tokens, output_tokens)
        b = self.cost(cheap, input_tokens, output_tokens)
        if b == 0.0:
            return float("inf") if a > 0 else 1.0
        return a / b
