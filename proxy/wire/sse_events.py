"""SSE framing shared by the translating adapters: named events out, chat-completion chunks in."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import orjson

from proxy.wire import sse


def named_event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event with an `event:` line, as the Responses API and Anthropic's Messages API send them."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ChatDelta(NamedTuple):
    """What one chat-completion chunk adds to the first choice (the only one the translators serve)."""

    reasoning: str  # `reasoning_content` (DeepSeek, vLLM) or `reasoning` (OpenRouter, Ollama)
    text: str
    tool_calls: tuple[dict[str, Any], ...]
    finish_reason: Any  # None until the last chunk of the choice


def read_chat(events: bytes) -> tuple[dict[str, Any] | None, list[ChatDelta]]:
    """A run of chat-completion SSE events (`[DONE]` and comments skipped): the last usage object in it,
    and the first choice's deltas in order (pieces of the wrong type read as empty)."""
    usage, deltas = None, []
    for chunk in sse.json_payloads([events]):
        if not isinstance(chunk, dict):
            continue
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            text = delta.get("content")
            deltas.append(
                ChatDelta(
                    reasoning if isinstance(reasoning, str) else "",
                    text if isinstance(text, str) else "",
                    tuple(call for call in delta.get("tool_calls") or () if isinstance(call, dict)),
                    choice.get("finish_reason"),
                )
            )
    return usage, deltas


class RelayedEvents(ABC):
    """Watches a stream of named events relayed unchanged (the Responses API, Anthropic's Messages): keeps
    every run for the reply, and hands each to `_watch` to read the usage and the finished object from."""

    __slots__ = ("_relayed", "final", "usage")

    def __init__(self) -> None:
        self._relayed: list[bytes] = []
        self.usage: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None

    def relay(self, events: bytes) -> bytes:
        self._relayed.append(events)
        self._watch(events)
        return events

    @abstractmethod
    def _watch(self, events: bytes) -> None:
        """Read what this format's events carry (usage, the finished object) from one relayed run."""

    @property
    def relayed(self) -> list[bytes]:
        return self._relayed


class SSEBuffer:
    """Reassembles SSE events from arbitrary byte runs: an upstream may split an event across reads."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """The complete events in `self._pending + data` (ending with a blank line); the rest waits."""
        data = (self._pending + data).replace(b"\r\n", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b""
        self._pending = data[cut + 2 :]
        return data[: cut + 2]

    def rest(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest
