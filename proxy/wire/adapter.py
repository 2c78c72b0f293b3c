"""What every wire format provides: the canonical endpoint it maps to, the shape checks of its request
body, how its prompt is counted, the shape check of an upstream reply, how an answer the proxy made
itself (retrieval) goes back to the client, its error shape, how a relayed stream tells its usage, and,
for a format a Chat Completions upstream does not speak, the translation to chat and back. Adding a
format is adding one adapter; `OpenAIWire` holds what the OpenAI-shaped formats share."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.errors import InvalidRequest, ProxyError
from proxy.wire import sse


class Endpoint:
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"  # OpenAI's Responses API
    MESSAGES = "messages"  # Anthropic's Messages API
    RESPONSES_INPUT_TOKENS = "responses_input_tokens"
    MESSAGES_COUNT_TOKENS = "messages_count_tokens"


class Counter(Protocol):
    """A token counter (proxy.services.tokens.TokenCounter)."""

    def text(self, s: str) -> int: ...

    def prompt(self, prompt: Any) -> int: ...

    def chat_prompt(self, messages: list[dict], tools: list | None = None, functions: list | None = None) -> int: ...


class UpstreamModel(Protocol):
    """What a format reads of a model's config (proxy.config.models.ModelConfig) to know if it speaks it."""

    provider: str
    api: str


class StreamAccount(Protocol):
    """Watches a relayed stream in the client's format: what to relay, and the usage it carried."""

    usage: dict[str, Any] | None
    final: dict[str, Any] | None  # the finished object a stream ends with, when its format has one

    def relay(self, events: bytes) -> bytes: ...

    @property
    def relayed(self) -> list[bytes]: ...


class ChatStreamTranslator(Protocol):
    """Turns a chat-completion SSE stream into a format's own stream (proxy.wire.responses.ResponsesStream)."""

    usage: dict[str, Any] | None  # the chat usage seen in the stream

    def start(self) -> bytes: ...

    def feed(self, events: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class WireAdapter(Protocol):
    endpoint: str  # the canonical endpoint (Endpoint.*)
    paths: tuple[str, ...]  # the HTTP paths that speak this format
    prompt_param: str  # the body field named in a context-length error
    conversational: bool  # a generation format a chat answer can stand in for (policies may inject, answer)
    counts_only: bool  # a token-counting endpoint: no generation, nothing to budget

    def validate(self, body: dict[str, Any]) -> None:
        """Raise InvalidRequest when the body's format-specific fields are malformed."""

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        """(prompt tokens, prompts in the request) of a validated body."""

    def check_reply(self, data: dict[str, Any]) -> None:
        """Raise BadGateway when an upstream's JSON reply is not this format's reply."""

    def reply_text(self, data: dict[str, Any]) -> str:
        """The generated text of a reply (counted when the upstream reported no usage)."""

    def stream_text(self, events: list[bytes]) -> str:
        """The generated text of relayed stream events (counted when no usage arrived)."""

    def answer_bytes(
        self, answer: dict[str, Any], stream: bool, include_usage: bool, body: dict[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        """The body of an answer the proxy made itself (a chat.completion), and whether it is an SSE stream."""

    def error_body(self, error: ProxyError) -> bytes:
        """An error in this format's own shape."""

    def stream_error(self, error: ProxyError) -> bytes:
        """A failure after the stream began, as this format's in-band error event."""

    def stream_account(self, include_usage: bool) -> StreamAccount:
        """A watcher for a stream relayed in this format."""

    def max_output(self, body: dict[str, Any]) -> int | None:
        """The request's own cap on generated tokens, if it sets one."""

    def limit_output(self, body: dict[str, Any], tokens: int) -> None:
        """Cap generated tokens (a policy's max_tokens) in this format's field."""

    def add_instruction(self, body: dict[str, Any], text: str, placement: str) -> bool:
        """Add a system instruction once, in its place; False when it is already there (or cannot be)."""

    def offers_tools(self, body: dict[str, Any]) -> bool: ...

    def wants_structured(self, body: dict[str, Any]) -> bool:
        """The request asks for JSON (a schema or a JSON object) rather than free text."""

    def asks_plain_text(self, body: dict[str, Any]) -> bool:
        """Only a plain text answer would do: no tools, no structured output, one choice (retrieval's test)."""

    def spoken_by(self, model: UpstreamModel) -> bool:
        """The model's upstream serves this format itself (else it is translated to chat)."""

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request as the chat request a Chat Completions upstream answers the same way."""

    def reply_from_chat(self, completion: dict[str, Any], body: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        """A chat.completion as this format's reply."""

    def chat_stream(self, body: dict[str, Any], model: str, prompt_tokens: int) -> ChatStreamTranslator:
        """A translator from a chat stream to this format's stream."""

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The client headers this format forwards to an upstream that speaks it (validated here)."""

    def count_answer(self, tokens: int) -> bytes:
        """A token-counting endpoint's answer (`counts_only` formats)."""


class OpenAIWire:
    """What the OpenAI-shaped formats (chat, completions, embeddings) share: OpenAI's error shape, the
    chat-style stream, `max_tokens`, and every upstream speaks them (litellm translates for the others)."""

    conversational = False
    counts_only = False

    def stream_text(self, events: list[bytes]) -> str:
        return sse.generated_text(events)

    def error_body(self, error: ProxyError) -> bytes:
        return error.body()

    def stream_error(self, error: ProxyError) -> bytes:
        return sse.event(error.body())

    def stream_account(self, include_usage: bool) -> StreamAccount:
        return sse.StreamAccount(include_usage)

    def max_output(self, body: dict[str, Any]) -> int | None:
        return body.get("max_completion_tokens") or body.get("max_tokens")

    def limit_output(self, body: dict[str, Any], tokens: int) -> None:
        body["max_tokens"] = tokens

    def add_instruction(self, body: dict[str, Any], text: str, placement: str) -> bool:
        return False

    def offers_tools(self, body: dict[str, Any]) -> bool:
        return bool(body.get("tools") or body.get("functions"))

    def wants_structured(self, body: dict[str, Any]) -> bool:
        fmt = body.get("response_format")
        return isinstance(fmt, dict) and fmt.get("type") not in (None, "text")

    def asks_plain_text(self, body: dict[str, Any]) -> bool:
        return False

    def spoken_by(self, model: UpstreamModel) -> bool:
        return True

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return body

    def reply_from_chat(self, completion: dict[str, Any], body: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        return completion

    def chat_stream(self, body: dict[str, Any], model: str, prompt_tokens: int) -> ChatStreamTranslator:
        raise NotImplementedError("an OpenAI-shaped format is never translated")

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        return {}

    def count_answer(self, tokens: int) -> bytes:
        raise NotImplementedError("not a token-counting endpoint")


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
