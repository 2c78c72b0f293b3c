"""Server-sent events as OpenAI-compatible APIs frame them: `data: <json>` events ending in a blank
line, `data: [DONE]` at the end of a chat or completions stream.

`StreamAccount` watches a relayed stream: the proxy asks OpenAI-compatible upstreams for usage in the
stream (`stream_options.include_usage`) so streamed spend is exact, and the usage-only chunk is dropped
again when the client did not ask for it. When no usage arrives (the upstream ignores the option, as
llama.cpp's server does, or the client left early), the generated text of the relayed deltas is what the
proxy counts; a client that asked for usage still gets its usage chunk (the counted one) before `[DONE]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from proxy.wire.content import choice_texts
from proxy.wire.usage import TokenUsage

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
# Fields of a chunk that the usage chunk the proxy adds copies from the stream's last chunk.
_CHUNK_FIELDS = ("id", "object", "created", "model", "system_fingerprint")


def event(payload: bytes) -> bytes:
    """One SSE event carrying `payload`."""
    return b"data: " + payload + b"\n\n"


def payloads(events: bytes) -> list[bytes]:
    """The data payloads of one or more events."""
    return [line[5:].strip() for line in events.split(b"\n") if line.startswith(b"data:")]


def json_payloads(events: list[bytes], strict: bool = False) -> Iterator[Any]:
    """The JSON objects carried by relayed events ([DONE] skipped; an unparseable payload skipped, or
    yielded as None when `strict`)."""
    for run in events:
        for payload in payloads(run):
            if payload == DONE:
                continue
            try:
                yield orjson.loads(payload)
            except orjson.JSONDecodeError:
                if strict:
                    yield None


class StreamAccount:
    """Watches relayed SSE events; knows the usage at the end."""

    __slots__ = ("_client_wants_usage", "_held_done", "_relayed", "final", "usage")

    def __init__(self, client_wants_usage: bool):
        self._client_wants_usage = client_wants_usage
        self._relayed: list[bytes] = []
        self._held_done = False
        self.usage: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None  # a chat stream ends with no finished object

    def relay(self, events: bytes) -> bytes:
        """Record a run of one or more events; the part to relay (all of it but a usage chunk the
        client did not ask for, and `[DONE]` while a usage chunk the client asked for is still owed)."""
        if b'"usage"' in events:
            events = b"".join([e + b"\n\n" for e in events.split(b"\n\n") if e and self._keep(e)])
        if self._client_wants_usage and self.usage is None and DONE in events:
            kept = b"".join([e + b"\n\n" for e in events.split(b"\n\n") if e and e.strip() != b"data: [DONE]"])
            self._held_done = self._held_done or len(kept) < len(events)
            events = kept
        if events:
            self._relayed.append(events)
        return events

    @property
    def owes_usage(self) -> bool:
        """The client asked for usage and the stream ended without any (the upstream sent none)."""
        return self._client_wants_usage and self.usage is None and bool(self._relayed)

    def usage_tail(self, usage: TokenUsage) -> bytes:
        """The usage chunk the stream owes its client (`usage`, as the proxy counted it), then `[DONE]`
        if the upstream sent it: the chunk copies the stream's own id, object, created and model."""
        last: dict[str, Any] = {}
        for data in json_payloads(self._relayed[-1:]):
            if isinstance(data, dict):
                last = data
        chunk = {k: last[k] for k in _CHUNK_FIELDS if k in last}
        chunk["choices"] = []
        chunk["usage"] = {
            "prompt_tokens": usage.input,
            "completion_tokens": usage.output,
            "total_tokens": usage.input + usage.output,
        }
        return event(orjson.dumps(chunk)) + (DONE_EVENT if self._held_done else b"")

    def _keep(self, one: bytes) -> bool:
        for payload in payloads(one):
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

    def generated_text(self) -> str:
        """Everything the relayed deltas generated (what is counted when no usage arrived)."""
        return generated_text(self._relayed)

    def counted_output_tokens(self, counter: Any) -> int:
        """The relayed deltas' tokens by `counter` (a TokenCounter)."""
        return counter.text(self.generated_text())


def generated_text(events: list[bytes]) -> str:
    """Everything the deltas of relayed chat or completions events generated."""
    parts: list[str] = []
    for data in json_payloads(events):
        for choice in data.get("choices") or () if isinstance(data, dict) else ():
            if isinstance(choice, dict):
                parts.extend(choice_texts(choice))
    return "".join(parts)
