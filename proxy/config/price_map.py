"""litellm's packaged price map, read as the JSON file shipped next to its package (without importing
litellm's runtime, which costs seconds of start-up and ~100 MB of memory): what `check` and the price
book know of a model's price when the policy file does not set one."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import orjson

_PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"


@cache
def packaged_price_map() -> dict[str, dict]:
    """litellm's price map as shipped in its wheel; empty when litellm is not installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    for location in spec.submodule_search_locations:
        path = Path(location) / _PRICE_MAP_FILE
        if path.is_file():
            data = orjson.loads(path.read_bytes())
            data.pop("sample_spec", None)
            return data
    return {}


def lookup_names(name: str, provider: str) -> list[str]:
    names = [name, f"{provider}/{name}"]
    if name.startswith("ft:"):
        # Fine-tuned OpenAI models: "ft:gpt-4o-mini-2024-07-18:org::id" is priced as "ft:gpt-4o-mini-2024-07-18".
        base = ":".join(name.split(":")[:2])
        names += [base, f"{provider}/{base}"]
    return names


def has_price(name: str, provider: str) -> bool:
    """Whether the packaged map prices `name` (as served by `provider`)."""
    entries = packaged_price_map()
    for key in lookup_names(name, provider):
        entry = entries.get(key)
        if entry and ("input_cost_per_token" in entry or "output_cost_per_token" in entry):
            return True
    return False


def context_window(name: str, provider: str) -> int | None:
    """The model's context window (`max_input_tokens`) in the packaged map, if it says."""
    entries = packaged_price_map()
    for key in lookup_names(name, provider):
        window = (entries.get(key) or {}).get("max_input_tokens")
        if isinstance(window, int) and window > 0:
            return window
    return None
