"""What every wire format provides: the canonical endpoint it maps to, the shape checks of its request
body, how its prompt is counted, the shape check of an upstream reply, and how an answer the proxy made
itself (retrieval) goes back to the client. Adding a format is adding one adapter."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.errors import InvalidRequest


class Endpoint:
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


class Counter(Protocol):
    """A token counter (proxy.services.tokens.TokenCounter)."""

    def text(self, s: str) -> int: ...

    def prompt(self, prompt: Any) -> int: ...

    def chat_prompt(self, messages: list[dict], tools: list | None = None, functions: list | None = None) -> int: ...


class WireAdapter(Protocol):
    endpoint: str  # the canonical endpoint (Endpoint.*)
    paths: tuple[str, ...]  # the HTTP paths that speak this format
    prompt_param: str  # the body field named in a context-length error

    def validate(self, body: dict[str, Any]) -> None:
        """Raise InvalidRequest when the body's format-specific fields are malformed."""

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        """(prompt tokens, prompts in the request) of a validated body."""

    def check_reply(self, data: dict[str, Any]) -> None:
        """Raise BadGateway when an upstream's JSON reply is not this format's reply."""

    def reply_text(self, data: dict[str, Any]) -> str:
        """The generated text of a reply (counted when the upstream reported no usage)."""

    def answer_bytes(self, answer: dict[str, Any], stream: bool, include_usage: bool) -> tuple[bytes, bool]:
        """The body of an answer the proxy made itself, and whether it is an SSE stream."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_prompt(value: Any, name: str) -> None:
    """A completions `prompt` or embeddings `input`: a string, strings, or token id arrays (non-empty)."""
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value) or all(is_int(x) for x in value):
            return
        if all(isinstance(x, list) and x and all(is_int(t) for t in x) for x in value):
            return
    raise InvalidRequest(
        f"'{name}' must be a string, an array of strings, or an array of token arrays (non-empty).", param=name
    )


def prompts_in(value: Any) -> int:
    """How many prompts a `prompt`/`input` value holds (a list of token ids is one)."""
    return len(value) if isinstance(value, list) and value and not isinstance(value[0], int) else 1
