"""The policy file's `api:` field: which models serve the Responses API natively (the rest are translated)."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_policy_text


def test_api_responses_is_only_for_openai_compatible_chat_models():
    ok = parse_policy_text("models:\n  m: {api_base: 'http://127.0.0.1:1/v1', api: responses}\n", "p.yaml", {})
    assert ok.models["m"].api == "responses"
    with pytest.raises(ConfigError, match="api: responses needs provider: openai"):
        parse_policy_text("models:\n  c: {provider: anthropic, api: responses}\n", "p.yaml", {})
    with pytest.raises(ConfigError, match=r"models\.m\.api"):
        parse_policy_text("models:\n  m: {api: messages}\n", "p.yaml", {})
