"""Exact cost for the usage providers report: cache reads, cache writes (both Anthropic TTLs), reasoning
tokens and prices above a context threshold, from litellm's packaged map and from the policy file's `price:`.

Usage payloads are shaped exactly as OpenAI and Anthropic document them, and each is validated against the
official SDK's usage type before it is priced.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from anthropic.types import Usage as AnthropicUsage
from openai.types import CompletionUsage
from openai.types.responses import ResponseUsage

from proxy.config import ConfigError, parse_policy_text
from proxy.services.pricing import PriceBook
from proxy.wire.usage import TokenUsage, usage_from

ROOT = Path(__file__).resolve().parents[1]


def _book(yaml_text: str) -> PriceBook:
    return PriceBook(parse_policy_text(yaml_text, "p.yaml", {}).models)


def _usage(payload: dict, sdk_type) -> TokenUsage:
    sdk_type.model_validate(payload)  # the payload is what the provider's own SDK parses
    usage = usage_from(payload)
    assert usage is not None
    return usage


def _cents(usd: float) -> float:
    return round(usd * 100, 4)


# Chat Completions with a warm prompt cache and reasoning (OpenAI's "Prompt caching" / "Reasoning" guides).
CHAT_USAGE = {
    "prompt_tokens": 120_000,
    "completion_tokens": 2_000,
    "total_tokens": 122_000,
    "prompt_tokens_details": {"cached_tokens": 100_000, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}

# The Responses API's usage of a reasoning model (ResponseUsage in the API reference).
RESPONSES_USAGE = {
    "input_tokens": 50_000,
    "input_tokens_details": {"cached_tokens": 40_000, "cache_write_tokens": 0},
    "output_tokens": 10_000,
    "output_tokens_details": {"reasoning_tokens": 8_000},
    "total_tokens": 60_000,
}

# Anthropic Messages with both cache TTLs ("Prompt caching": input_tokens counts only the uncached tail).
ANTHROPIC_USAGE = {
    "input_tokens": 2_000,
    "cache_creation_input_tokens": 20_000,
    "cache_read_input_tokens": 180_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 15_000, "ephemeral_1h_input_tokens": 5_000},
    "output_tokens": 4_000,
    "service_tier": "standard",
}


def test_openai_cached_prompt_tokens_cost_the_cache_read_price():
    book = _book("models:\n  gpt-4o: {}\n")
    usage = _usage(CHAT_USAGE, CompletionUsage)
    assert (usage.input, usage.cached_input, usage.output) == (120_000, 100_000, 2_000)
    # gpt-4o: $2.50 in, $1.25 cached, $10 out per million: 20k x 2.50 + 100k x 1.25 + 2k x 10 = $0.195.
    assert _cents(book.cost("gpt-4o", usage)) == 19.5
    # Priced as full input it was $0.32: the over-count the issue is about.
    assert _cents(book.cost("gpt-4o", usage.input, usage.output)) == 32.0


def test_reasoning_tokens_are_billed_as_output_and_reported_apart():
    book = _book("models:\n  o3: {}\n")
    usage = _usage(RESPONSES_USAGE, ResponseUsage)
    assert (usage.reasoning, usage.output) == (8_000, 10_000)
    parts = book.price("o3").breakdown(usage)
    # o3: $2 in, $0.50 cached, $8 out: 10k x 2 + 40k x 0.5 + 10k x 8 = $0.12, of which reasoning 8k x 8 = $0.064.
    assert _cents(parts.total) == 12.0
    assert _cents(parts.reasoning) == 6.4
    assert _cents(parts.output) == 1.6
    assert _cents(book.cost("o3", usage)) == 12.0


def test_anthropic_cache_reads_and_both_cache_write_ttls():
    book = _book("models:\n  claude-sonnet-4-5: {provider: anthropic}\n")
    usage = _usage(ANTHROPIC_USAGE, AnthropicUsage)
    assert usage == TokenUsage(
        input=202_000, output=4_000, cached_input=180_000, cache_write=20_000, cache_write_1h=5_000
    )
    parts = book.price("claude-sonnet-4-5").breakdown(usage)
    # $3 in, $0.30 read, $3.75 5-minute write, $6 1-hour write, $15 out per million.
    assert _cents(parts.input) == 0.6  # 2k x 3
    assert _cents(parts.cached_input) == 5.4  # 180k x 0.30
    assert _cents(parts.cache_write) == 8.625  # 15k x 3.75 + 5k x 6
    assert _cents(parts.output) == 6.0  # 4k x 15
    assert _cents(book.cost("claude-sonnet-4-5", usage)) == 20.625
    assert _cents(book.cost("claude-sonnet-4-5", usage.input, usage.output)) == 66.6


def test_an_anthropic_write_without_the_ttl_split_is_a_five_minute_write():
    book = _book("models:\n  claude-sonnet-4-5: {provider: anthropic}\n")
    payload = {"input_tokens": 10, "cache_creation_input_tokens": 1_000_000, "cache_read_input_tokens": 0}
    usage = _usage({**payload, "output_tokens": 0}, AnthropicUsage)
    assert _cents(book.cost("claude-sonnet-4-5", usage)) == 375.003


def test_an_agent_session_with_a_warm_cache_reconciles_to_the_cent():
    # Forty turns of a coding agent: the first writes a 30k-token prefix, every later turn reads it.
    book = _book("models:\n  claude-sonnet-4-5: {provider: anthropic}\n")
    expected_micro = 0  # USD per million tokens x tokens: integer arithmetic, no float drift
    total = 0.0
    for turn in range(40):
        payload = {
            "input_tokens": 500 + 10 * turn,
            "cache_creation_input_tokens": 30_000 if turn == 0 else 0,
            "cache_read_input_tokens": 0 if turn == 0 else 30_000,
            "output_tokens": 800,
        }
        total += book.cost("claude-sonnet-4-5", _usage(payload, AnthropicUsage))
        expected_micro += (500 + 10 * turn) * 300 + (30_000 * 375 if turn == 0 else 30_000 * 30) + 800 * 1500
    assert round(total, 2) == round(expected_micro / 1e8, 2) == 1.03


def test_prices_above_a_context_threshold_apply_to_the_whole_request():
    book = _book("models:\n  gemini-2.5-pro: {provider: gemini}\n")
    below = _usage({"prompt_tokens": 150_000, "completion_tokens": 1_000, "total_tokens": 151_000}, CompletionUsage)
    # $1.25 in, $10 out up to 200k prompt tokens.
    assert _cents(book.cost("gemini-2.5-pro", below)) == 19.75
    above = _usage(
        {
            "prompt_tokens": 250_000,
            "completion_tokens": 1_000,
            "total_tokens": 251_000,
            "prompt_tokens_details": {"cached_tokens": 50_000},
        },
        CompletionUsage,
    )
    # Above 200k: $2.50 in, $0.25 cached, $15 out for every token: 200k x 2.5 + 50k x 0.25 + 1k x 15.
    assert _cents(book.cost("gemini-2.5-pro", above)) == 52.75
    # The plain (input, output) form and budget reservations see the tier too.
    assert _cents(book.cost("gemini-2.5-pro", 250_000, 1_000)) == 64.0
    assert _cents(book.price("gemini-2.5-pro").worst_case_cost(250_000, 1_000)) == 64.0


def test_a_worst_case_reservation_covers_the_dearest_cache_write():
    price = _book("models:\n  claude-sonnet-4-5: {provider: anthropic}\n").price("claude-sonnet-4-5")
    plain = price.worst_case_cost(100_000, 1_000)
    assert _cents(plain) == 31.5
    assert _cents(price.worst_case_cost(100_000, 1_000, cache_writes=True)) == 61.5  # at the 1-hour write price
    usage = TokenUsage(input=100_000, output=1_000, cache_write=100_000, cache_write_1h=100_000)
    assert price.cost(usage) == pytest.approx(price.worst_case_cost(100_000, 1_000, cache_writes=True))


PRICE_YAML = """models:
  house:
    api_base: http://127.0.0.1:1/v1
    price:
      input_per_mtok: 1.0
      output_per_mtok: 4.0
      cached_input_per_mtok: 0.1
      cache_write_per_mtok: 1.25
      cache_write_1h_per_mtok: 2.0
      reasoning_per_mtok: 8.0
      tiers:
        - {above_input_tokens: 100000, input_per_mtok: 2.0, output_per_mtok: 6.0}
"""


def test_the_policy_files_price_sets_every_kind_of_token():
    book = _book(PRICE_YAML)
    usage = TokenUsage(
        input=10_000, output=3_000, cached_input=5_000, cache_write=2_000, cache_write_1h=500, reasoning=1_000
    )
    parts = book.price("house").breakdown(usage)
    assert book.price("house").source == "policy file"
    assert _cents(parts.input) == 0.3  # 3k uncached x 1
    assert _cents(parts.cached_input) == 0.05  # 5k x 0.1
    assert _cents(parts.cache_write) == 0.2875  # 1.5k x 1.25 + 0.5k x 2
    assert _cents(parts.output) == 0.8  # 2k x 4
    assert _cents(parts.reasoning) == 0.8  # 1k x 8
    # Above 100k the tier's input and output prices apply; its cache read price is the flat one.
    big = TokenUsage(input=200_000, output=1_000, cached_input=100_000)
    assert _cents(book.cost("house", big)) == 20 + 1 + 0.6


def test_a_price_without_cache_or_reasoning_prices_bills_them_as_input_and_output():
    book = _book(
        "models:\n  local:\n    api_base: http://127.0.0.1:1/v1\n    price: {input_per_mtok: 1, output_per_mtok: 2}\n"
    )
    usage = TokenUsage(input=1_000_000, output=1_000_000, cached_input=400_000, cache_write=100_000, reasoning=10)
    assert _cents(book.cost("local", usage)) == 300.0


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ("{input_per_mtok: 1, cached_input_per_mtok: 2}", "a cache read never costs more"),
        ("{input_per_mtok: 1, cache_write_per_mtok: -1}", "cache_write_per_mtok"),
        (
            "{input_per_mtok: 1, tiers: [{above_input_tokens: 200000}, {above_input_tokens: 100000}]}",
            "strictly ascending above_input_tokens",
        ),
        ("{input_per_mtok: 1, tiers: [{above_input_tokens: 0}]}", "above_input_tokens"),
        ("{input_per_mtok: 1, cache_read_per_mtok: 0.1}", "cache_read_per_mtok"),
    ],
)
def test_bad_prices_are_config_errors(price, message):
    with pytest.raises(ConfigError) as e:
        parse_policy_text(f"models:\n  m:\n    api_base: http://127.0.0.1:1/v1\n    price: {price}\n", "p.yaml", {})
    assert message in str(e.value)


def test_check_names_the_line_of_a_bad_price(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "models:\n  m:\n    api_base: http://127.0.0.1:1/v1\n    price: {input_per_mtok: 1, cached_input_per_mtok: 3}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1
    assert "p.yaml:4: models.m.price" in r.stderr and "a cache read never costs more" in r.stderr, r.stderr
    path.write_text(PRICE_YAML)
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr


def test_openai_cache_writes_are_read_from_both_openai_shapes():
    chat = {**CHAT_USAGE, "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 30_000}}
    responses = {**RESPONSES_USAGE, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 30_000}}
    assert _usage(chat, CompletionUsage).cache_write == 30_000
    assert _usage(responses, ResponseUsage).cache_write == 30_000
