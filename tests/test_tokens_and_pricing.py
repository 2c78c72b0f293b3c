"""Token counting against OpenAI's published counts; the price book and cost multiples."""

from __future__ import annotations

import pytest

from proxy.config import parse_policy_text
from proxy.services.pricing import PriceBook
from proxy.services.tokens import TokenCounter, counter_for, encoding_name_for

# The example from OpenAI's cookbook "How to count tokens with tiktoken".
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch "
        "base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_chat_prompt_count_matches_openai_cookbook():
    # The cookbook reports 129 prompt tokens for gpt-3.5-turbo / gpt-4 (cl100k_base), matching the API's usage.
    assert counter_for("gpt-4").chat_prompt(COOKBOOK_MESSAGES) == 129
    assert counter_for("gpt-4o").chat_prompt(COOKBOOK_MESSAGES) == 124


def test_encodings_per_model_family():
    assert encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for("text-embedding-3-small") == "cl100k_base"
    assert encoding_name_for("ft:gpt-3.5-turbo-0125:acme::abc") == "cl100k_base"
    assert encoding_name_for("some-local-llama") == "o200k_base"


def test_content_parts_and_images_and_tools():
    c = TokenCounter("o200k_base")
    text_only = c.chat_prompt([{"role": "user", "content": "describe"}])
    parts = c.chat_prompt(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}},
                ],
            }
        ]
    )
    assert parts - text_only == 85
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert c.chat_prompt([{"role": "user", "content": "describe"}], tools) > text_only


def test_prompt_forms():
    c = TokenCounter("cl100k_base")
    assert c.prompt("hello world") == 2
    assert c.prompt(["hello world", "hello"]) == 3
    assert c.prompt([1, 2, 3]) == 3
    assert c.prompt([[1, 2], [3]]) == 3


def _book(yaml_text: str) -> PriceBook:
    return PriceBook(parse_policy_text(yaml_text, "p.yaml", {}).models)


def test_price_book_reads_litellms_packaged_map_and_yaml_overrides():
    book = _book(
        "models:\n  gpt-4o: {}\n  gpt-4o-mini: {}\n  gpt-4: {}\n  gpt-3.5-turbo: {}\n"
        "  local: {price: {input_per_mtok: 0.05, output_per_mtok: 0.05}}\n"
        "  tuned: {upstream_model: 'ft:gpt-3.5-turbo-0125:acme::xyz'}\n  mystery: {}\n"
    )
    assert book.price("gpt-4o").input_per_token == pytest.approx(2.5e-6)
    assert book.price("gpt-4o").max_input_tokens == 128000
    assert book.price("local").cost(1_000_000, 1_000_000) == pytest.approx(0.10)
    assert book.is_known("tuned") and book.price("tuned").input_per_token > book.price("gpt-3.5-turbo").input_per_token
    assert not book.is_known("mystery")
    # GPT-4 vs GPT-3.5: the founding "~50x" is a property of the price map, not a constant in the code.
    assert book.cost_multiple("gpt-4", "gpt-3.5-turbo") > 20
    assert book.cost_multiple("gpt-4o", "gpt-4o-mini") == pytest.approx(16.67, rel=0.01)
    assert book.cost_multiple("gpt-4o", "local", 1000, 250) == pytest.approx(80.0)
