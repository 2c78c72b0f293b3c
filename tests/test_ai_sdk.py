"""The Vercel AI SDK (Node) through the real proxy: its default `openai(model)`, which speaks the Responses API,
with generateText, streamText and a tool-call turn, to a Responses upstream (forwarded natively) and to a Chat
Completions upstream (translated); and `anthropic(model)` (the Messages API) to an Anthropic upstream and to a
translated one. The packages come from tests/node's lock file (`npm ci`), as for tests/test_mock_fidelity.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import NODE_DIR, MockUpstream, Server, start_proxy
from tests.test_agent_apis import KEYS, MESSAGES_MODELS, RESPONSES_MODELS, _policy, upstream_path


@pytest.fixture(scope="module")
def sdk_proxy(session_tmp: Path, mock_upstream: MockUpstream) -> Iterator[Server]:
    server = start_proxy(session_tmp, _policy(mock_upstream.url))
    yield server
    server.stop()


def _ai_sdk(node: str, server: Server, openai_model: str, anthropic_model: str) -> dict:
    done = subprocess.run(
        [node, "ai_sdk_clients.mjs", server.url, KEYS["alpha"], openai_model, anthropic_model],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout, done.stderr + done.stdout
    out = orjson.loads(done.stdout.splitlines()[-1])
    for name, entry in out.items():
        assert "error" not in entry, (name, entry)
    return out


@pytest.mark.parametrize(("openai_model", "anthropic_model"), list(zip(RESPONSES_MODELS, MESSAGES_MODELS, strict=True)))
def test_ai_sdk_default_openai_and_anthropic_models_through_the_proxy(
    sdk_proxy,
    mock,
    node_sdk,
    openai_model,
    anthropic_model,
):
    out = _ai_sdk(node_sdk, sdk_proxy, openai_model, anthropic_model)

    generated = out["openai_generate"]
    assert len(generated["text"].split()) == 32 and generated["finishReason"] == "stop"
    assert generated["usage"]["outputTokens"] == 32 and generated["usage"]["inputTokens"] > 0

    streamed = out["openai_stream"]
    assert streamed["deltas"] == 32 and len(streamed["text"].split()) == 32
    assert streamed["finishReason"] == "stop" and streamed["usage"]["outputTokens"] == 32

    call, answer = out["openai_tool_turn"]["steps"]
    assert call["finishReason"] == "tool-calls"
    assert call["toolCalls"] == [{"name": "get_weather", "input": {"city": "Paris"}}]
    assert call["toolResults"] == ["18C in Paris"]
    assert answer["finishReason"] == "stop" and out["openai_tool_turn"]["text"]

    for name in ("anthropic_generate", "anthropic_stream"):
        reply = out[name]
        assert len(reply["text"].split()) == 32 and reply["finishReason"] == "stop", (name, reply)
        assert reply["usage"]["outputTokens"] == 32
    assert out["anthropic_stream"]["deltas"] >= 1  # as many text deltas as the upstream sent
    # The SDK spoke the Responses and Messages APIs to the proxy; it forwarded them or translated them to chat.
    if openai_model == "gpt-resp":
        assert mock.calls(upstream_path(mock, openai_model)) == 4 and mock.calls("/v1/messages") == 2
        assert mock.calls("/v1/chat/completions") == 0
    else:
        assert mock.calls("/v1/chat/completions") == 6  # 4 from openai(model), 2 from anthropic(model)
