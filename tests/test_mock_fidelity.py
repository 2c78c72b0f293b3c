"""The mock upstream speaks OpenAI's shapes: every reply and stream chunk validates against the openai SDK's own
types (strictly, with no field the type does not know), and the official Node SDK's helpers work through the proxy
on top of it (the chat stream helper, streamed completions, default base64 embeddings)."""

from __future__ import annotations

import base64
import struct
import subprocess
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import BaseModel
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import NODE_DIR, TEAM_KEYS, client_for


def _strict(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """`data` as the SDK's type, validated strictly; a field the type does not declare anywhere fails too."""
    parsed = model.model_validate(data, strict=True)

    def no_extras(value: Any, where: str) -> None:
        if isinstance(value, BaseModel):
            assert not value.model_extra, f"{where}: fields unknown to {type(value).__name__}: {value.model_extra}"
            for name in type(value).model_fields:
                no_extras(getattr(value, name), f"{where}.{name}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                no_extras(item, f"{where}[{i}]")

    no_extras(parsed, model.__name__)
    return parsed


def _sse(url: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        payloads = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        content_type = r.headers["content-type"]
    assert payloads[-1] == "[DONE]"
    return content_type, [orjson.loads(p) for p in payloads[:-1]]


def test_mock_chat_reply_and_stream_chunks_are_the_sdks_types(mock):
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    reply = _strict(ChatCompletion, httpx.post(mock.url + "/v1/chat/completions", json=body).json())
    assert reply.choices[0].message.role == "assistant"

    content_type, chunks = _sse(
        mock.url + "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert content_type.startswith("text/event-stream")
    parsed = [_strict(ChatCompletionChunk, c) for c in chunks]
    assert parsed[0].choices[0].delta.role == "assistant"  # the first delta names the role, as OpenAI's does
    assert all(c.choices[0].delta.role is None for c in parsed[1:-2])
    assert parsed[-2].choices[0].finish_reason == "stop"
    assert parsed[-1].choices == [] and parsed[-1].usage == reply.usage
    assert "".join(c.choices[0].delta.content or "" for c in parsed[:-1]) == reply.choices[0].message.content


def test_mock_streams_completions_as_text_completion_chunks(mock):
    body = {"model": "m", "prompt": ["first prompt", "second prompt"], "max_tokens": 6}
    reply = _strict(Completion, httpx.post(mock.url + "/v1/completions", json=body).json())

    content_type, chunks = _sse(
        mock.url + "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert content_type.startswith("text/event-stream")
    # The SDK's stream chunk type is Completion, whose finish_reason is declared non-null; OpenAI's stream (and
    # the mock's) sends null until a choice's last chunk, so that one field is checked apart.
    finish = [[ch["finish_reason"] for ch in c["choices"]] for c in chunks]
    parsed = [
        _strict(Completion, {**c, "choices": [{**ch, "finish_reason": "length"} for ch in c["choices"]]})
        for c in chunks
    ]
    assert {c.object for c in parsed} == {"text_completion"}
    *pieces, usage = parsed
    for choice in reply.choices:
        streamed = [i for i, c in enumerate(pieces) if c.choices and c.choices[0].index == choice.index]
        assert "".join(pieces[i].choices[0].text for i in streamed) == choice.text
        assert [finish[i][0] for i in streamed] == [None] * (len(streamed) - 1) + ["stop"]
    assert usage.choices == [] and usage.usage == reply.usage


def test_mock_embeddings_in_base64_are_the_float32_bytes_of_the_float_reply(mock):
    body = {"model": "m", "input": ["alpha", "beta"]}
    floats = _strict(CreateEmbeddingResponse, httpx.post(mock.url + "/v1/embeddings", json=body).json())
    encoded = httpx.post(mock.url + "/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    assert all(isinstance(d["embedding"], str) for d in encoded["data"])
    for want, got in zip(floats.data, encoded["data"], strict=True):
        raw = base64.b64decode(got["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(want.embedding, abs=1e-6)
    # The Python SDK asks for base64 by default and decodes it.
    sdk = openai.OpenAI(base_url=mock.url + "/v1", api_key="unused", max_retries=0)
    reply = sdk.embeddings.create(model="m", input=["alpha", "beta"])
    for want, got in zip(floats.data, reply.data, strict=True):
        assert got.embedding == pytest.approx(want.embedding, abs=1e-6)


def test_python_sdk_streams_completions_through_the_proxy(proxy, mock):
    chunks = list(client_for(proxy).completions.create(model="small", prompt="say something", stream=True))
    assert chunks and all(isinstance(c, Completion) and c.object == "text_completion" for c in chunks)
    assert len("".join(c.choices[0].text for c in chunks if c.choices).split()) == 32


def test_node_sdk_stream_helper_completions_stream_and_base64_embeddings_through_the_proxy(proxy, mock, node_sdk):
    done = subprocess.run(
        [node_sdk, "sdk_clients.mjs", proxy.url + "/v1", TEAM_KEYS["alpha"], "small", "embed"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)

    chat = out["chat_stream"]
    assert "error" not in chat, chat
    assert chat["role"] == "assistant" and len(chat["content"].split()) == 32 and chat["finish_reason"] == "stop"
    assert chat["usage"]["completion_tokens"] == 32

    completions = out["completions_stream"]
    assert "error" not in completions, completions
    assert completions["objects"] == ["text_completion"] and completions["finish_reason"] == ["stop"]
    assert len(completions["text"].split()) == 32

    embeddings = out["embeddings"]
    assert "error" not in embeddings, embeddings
    texts = ["first text", "second text"]
    direct = client_for(proxy).embeddings.create(model="embed", input=texts, encoding_format="float")
    assert len(embeddings) == 2
    for want, got in zip(direct.data, embeddings, strict=True):
        assert got == pytest.approx(want.embedding, abs=1e-6)
