"""Token usage: the one canonical shape, read from every wire format's usage object.

Chat Completions and Completions report `prompt_tokens` / `completion_tokens` (with
`prompt_tokens_details.cached_tokens` and `completion_tokens_details.reasoning_tokens`), the Responses API
`input_tokens` / `output_tokens` (with `input_tokens_details` / `output_tokens_details`; recent OpenAI models
also report `cache_write_tokens` there), Anthropic's
Messages `input_tokens` (uncached only) plus `cache_read_input_tokens` and `cache_creation_input_tokens`.
`TokenUsage.input` is always every prompt token, cached or not, so prices can split it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def is_int(v: Any) -> bool:
    """A JSON integer (a bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


# Not frozen: a frozen dataclass costs ~5x to build, and one is built per request; treat it as a value.
@dataclass(slots=True)
class TokenUsage:
    input: int = 0  # every prompt token, cached ones and cache writes included
    output: int = 0  # every generated token, reasoning included
    cached_input: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write: int = 0  # prompt tokens written to the cache (Anthropic bills them above input)
    cache_write_1h: int = 0  # of those, written with the 1-hour TTL
    reasoning: int = 0  # output tokens spent on reasoning (billed as output)
    counted: bool = False  # counted by the proxy (tiktoken) because the upstream reported none


def _detail(usage: dict[str, Any], name: str, field: str) -> int:
    details = usage.get(name)
    value = details.get(field) if isinstance(details, dict) else None
    return value if is_int(value) and value > 0 else 0


def _anthropic_usage(usage: dict[str, Any]) -> TokenUsage:
    uncached = usage["input_tokens"]
    read = usage.get("cache_read_input_tokens")
    write = usage.get("cache_creation_input_tokens")
    read = read if is_int(read) and read > 0 else 0
    write = write if is_int(write) and write > 0 else 0
    write_1h = _detail(usage, "cache_creation", "ephemeral_1h_input_tokens")
    output = usage.get("output_tokens")
    return TokenUsage(
        input=uncached + read + write,
        output=output if is_int(output) else 0,
        cached_input=read,
        cache_write=write,
        cache_write_1h=min(write_1h, write),
    )


def usage_from(usage: Any) -> TokenUsage | None:
    """The canonical usage of a usage object in any of the supported shapes, or None when it has no
    integer prompt-token count (absent, null, or malformed)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if is_int(prompt):
        completion = usage.get("completion_tokens")
        return TokenUsage(
            input=prompt,
            output=completion if is_int(completion) else 0,
            cached_input=_detail(usage, "prompt_tokens_details", "cached_tokens"),
            cache_write=_detail(usage, "prompt_tokens_details", "cache_write_tokens"),
            reasoning=_detail(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    if not is_int(usage.get("input_tokens")):
        return None
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        return _anthropic_usage(usage)
    output = usage.get("output_tokens")
    return TokenUsage(
        input=usage["input_tokens"],
        output=output if is_int(output) else 0,
        cached_input=_detail(usage, "input_tokens_details", "cached_tokens"),
        cache_write=_detail(usage, "input_tokens_details", "cache_write_tokens"),
        reasoning=_detail(usage, "output_tokens_details", "reasoning_tokens"),
    )


def counted_usage(input_tokens: int, output_tokens: int) -> TokenUsage:
    """Usage the proxy counted itself when the upstream reported none."""
    return TokenUsage(input=input_tokens, output=output_tokens, counted=True)
