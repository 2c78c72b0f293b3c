"""Relaying an upstream SSE stream to the client, event by event, while accounting its tokens.

The proxy asks OpenAI-compatible upstreams for usage in the stream (`stream_options.include_usage`)
so streamed spend is exact; the usage-only chunk is dropped again when the client did not ask for
it. When no usage arrives (the upstream ignores the option, or the client left early), completion
tokens are counted from the deltas that were relayed.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.services.tokens import TokenCounter


def _payloads(event: bytes) -> list[bytes]:
    return [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]


class StreamAccount:
    """Watches relayed SSE events; knows the usage at the end."""

    __slots__ = ("_client_wants_usage", "_relayed", "started_output", "usage")

    def __init__(self, client_wants_usage: bool):
        self._client_wants_usage = client_wants_usage
        self._relayed: list[bytes] = []
        self.usage: dict[str, Any] | None = None
        self.started_output = False

    def relay(self, events: bytes) -> bytes:
        """Record a run of one or more events; the part to relay (all of it but a usage chunk the
        client did not ask for)."""
        if b'"usage"' in events:
            events = b"".join([e + b"\n\n" for e in events.split(b"\n\n") if e and self._keep(e)])
        if events:
            self._relayed.append(events)
        return events

    def _keep(self, event: bytes) -> bool:
        for payload in _payloads(event):
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict):
                self.usage = usage
                if not data.get("choices") and not self._client_wants_usage:
                    return False
        return True

    @property
    def relayed(self) -> list[bytes]:
        """The runs of events relayed to the client so far (the semantic cache reads the answer from them)."""
        return self._relayed

    def counted_output_tokens(self, counter: TokenCounter) -> int:
        parts: list[str] = []
        for event in self._relayed:
            for payload in _payloads(event):
                if payload == b"[DONE]":
                    continue
                try:
                    data = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                for choice in data.get("choices") or () if isinstance(data, dict) else ():
                    parts.extend(_choice_texts(choice))
        return counter.text("".join(parts))


def _choice_texts(choice: dict[str, Any]) -> list[str]:
    out: list[str] = []
    text = choice.get("text")
    if isinstance(text, str):
        out.append(text)
    for key in ("delta", "message"):
        msg = choice.get(key)
        if not isinstance(msg, dict):
            continue
        for field in ("content", "reasoning_content", "refusal"):
            v = msg.get(field)
            if isinstance(v, str):
                out.append(v)
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                out.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
    return out


def counted_reply_tokens(data: dict[str, Any], counter: TokenCounter) -> int:
    """Completion tokens of a non-stream reply that came without usage."""
    parts: list[str] = []
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            parts.extend(_choice_texts(choice))
    return counter.text("".join(parts))


def completion_as_events(answer: dict[str, Any], include_usage: bool) -> bytes:
    """A chat.completion the proxy answered itself (e.g. from retrieval), as the SSE stream a client
    that asked for `stream: true` expects: a role chunk, the content, the finish, usage if asked, [DONE]."""
    base = {k: answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    base["object"] = "chat.completion.chunk"
    events = []
    for choice in answer.get("choices") or ():
        message = choice.get("message") or {}
        index = choice.get("index", 0)
        for delta, finish in (
            ({"role": "assistant", "content": ""}, None),
            ({"content": message.get("content") or ""}, None),
            ({}, choice.get("finish_reason") or "stop"),
        ):
            chunk = {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if include_usage and isinstance(answer.get("usage"), dict):
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": answer["usage"]}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)
