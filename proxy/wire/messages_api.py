"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) as a wire adapter: its
shape checks and prompt counting, Anthropic's error shape, its stream's usage (`message_start` and
`message_delta`), the `anthropic-version` / `anthropic-beta` headers a native upstream gets, and the
translation to and from chat (proxy/wire/anthropic.py) for OpenAI-compatible upstreams."""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.errors import BadGateway, InvalidRequest, ProxyError
from proxy.wire import anthropic as translate
from proxy.wire import sse
from proxy.wire.adapter import Counter, Endpoint, OpenAIWire, UpstreamModel, is_int
from proxy.wire.sse_events import RelayedEvents

DEFAULT_VERSION = "2023-06-01"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BETA = re.compile(r"^[A-Za-z0-9._\-]{1,64}(\s*,\s*[A-Za-z0-9._\-]{1,64}){0,15}$")
_DELTA_TEXT = ("text", "partial_json", "thinking")


class MessagesAccount(RelayedEvents):
    """Watches a Messages stream: relays every event; usage is `message_start`'s (the prompt, cache reads
    and writes) updated by `message_delta`'s (the output so far)."""

    __slots__ = ()

    def _watch(self, events: bytes) -> None:
        if b'"usage"' in events:
            for data in sse.json_payloads([events]):
                if not isinstance(data, dict):
                    continue
                kind = data.get("type")
                holder = data.get("message") if kind == "message_start" else data if kind == "message_delta" else None
                usage = holder.get("usage") if isinstance(holder, dict) else None
                if isinstance(usage, dict):
                    self.usage = {**(self.usage or {}), **{k: v for k, v in usage.items() if v is not None}}


def _is_block(block: Any) -> bool:
    return isinstance(block, dict) and isinstance(block.get("type"), str)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: a non-empty array of messages is required.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: must be 'user' or 'assistant'.", param=f"messages.{i}.role")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(_is_block(b) for b in content):
            raise InvalidRequest(
                f"messages.{i}.content: must be a string or an array of content blocks with a 'type'.",
                param=f"messages.{i}.content",
            )


def _text_of_blocks(blocks: Any) -> str:
    parts: list[str] = []
    for block in blocks or ():
        if not isinstance(block, dict):
            continue
        for key in ("text", "thinking", "name"):
            if isinstance(block.get(key), str):
                parts.append(block[key])
        if block.get("type") == "tool_use":
            parts.append(orjson.dumps(block.get("input") or {}).decode())
    return "".join(parts)


class MessagesWire(OpenAIWire):
    endpoint = Endpoint.MESSAGES
    paths = ("/v1/messages",)
    prompt_param = "messages"
    conversational = True
    needs_max_tokens = True

    def validate(self, body: dict[str, Any]) -> None:
        _check_messages(body.get("messages"))
        if self.needs_max_tokens:
            limit = body.get("max_tokens")
            if not is_int(limit) or limit < 1:
                raise InvalidRequest("max_tokens: a positive integer is required.", param="max_tokens")
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise InvalidRequest("system: must be a string or an array of text blocks.", param="system")
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise InvalidRequest("tools: must be an array of tool objects.", param="tools")

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        try:
            messages = translate.chat_messages(body)
            tools = translate._tools(body["tools"]) if body.get("tools") else None
        except InvalidRequest:
            # Blocks only Anthropic takes (server tools, search results): counted as their JSON text.
            return counter.text(orjson.dumps([body.get("system"), body["messages"], body.get("tools")]).decode()), 1
        return counter.chat_prompt(messages, tools), 1

    def check_reply(self, data: dict[str, Any]) -> None:
        if not isinstance(data.get("content"), list):
            raise BadGateway("The upstream's reply has no 'content' list: it is not a Message.")

    def reply_text(self, data: dict[str, Any]) -> str:
        return _text_of_blocks(data.get("content"))

    def stream_text(self, events: list[bytes]) -> str:
        parts: list[str] = []
        for data in sse.json_payloads(events):
            delta = data.get("delta") if isinstance(data, dict) and data.get("type") == "content_block_delta" else None
            if isinstance(delta, dict):
                parts += [delta[k] for k in _DELTA_TEXT if isinstance(delta.get(k), str)]
        return "".join(parts)

    def answer_bytes(
        self, answer: dict[str, Any], stream: bool, include_usage: bool, body: dict[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        message = translate.message_from_chat(answer, answer.get("model") or "")
        if stream:
            return translate.message_as_events(message), True
        return orjson.dumps(message), False

    def error_body(self, error: ProxyError) -> bytes:
        return translate.error_body(error)

    def stream_error(self, error: ProxyError) -> bytes:
        return translate.error_event(error)

    def stream_account(self, include_usage: bool) -> MessagesAccount:
        return MessagesAccount()

    def max_output(self, body: dict[str, Any]) -> int | None:
        return body.get("max_tokens")

    def add_instruction(self, body: dict[str, Any], text: str, placement: str) -> bool:
        """At the end of `system` (a text block after any cached ones, so a cached prefix stays cached)."""
        system = body.get("system")
        if isinstance(system, str) or system is None:
            if system and text in system:
                return False
            body["system"] = f"{system}\n\n{text}" if system else text
            return True
        if any(isinstance(b, dict) and text in str(b.get("text", "")) for b in system):
            return False
        body["system"] = [*system, {"type": "text", "text": text}]
        return True

    def offers_tools(self, body: dict[str, Any]) -> bool:
        return bool(body.get("tools"))

    def wants_structured(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("output_format"), dict)

    def asks_plain_text(self, body: dict[str, Any]) -> bool:
        return not (self.offers_tools(body) or self.wants_structured(body))

    def spoken_by(self, model: UpstreamModel) -> bool:
        return model.provider == "anthropic"

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return translate.chat_request(body)

    def reply_from_chat(self, completion: dict[str, Any], body: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        return translate.message_from_chat(completion, completion.get("model") or body.get("model") or "")

    def chat_stream(self, body: dict[str, Any], model: str, prompt_tokens: int) -> translate.MessagesStream:
        return translate.MessagesStream(model, prompt_tokens)

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        version = headers.get("anthropic-version", DEFAULT_VERSION).strip()
        if not _VERSION.match(version):
            raise InvalidRequest("anthropic-version: must be a date such as 2023-06-01.", param="anthropic-version")
        out = {"anthropic-version": version}
        beta = headers.get("anthropic-beta")
        if beta is not None:
            if not _BETA.match(beta.strip()):
                raise InvalidRequest("anthropic-beta: must be comma-separated beta names.", param="anthropic-beta")
            out["anthropic-beta"] = beta.strip()
        return out


class MessagesCountTokensWire(MessagesWire):
    """`POST /v1/messages/count_tokens`: a Messages request's prompt tokens, nothing generated."""

    endpoint = Endpoint.MESSAGES_COUNT_TOKENS
    paths = ("/v1/messages/count_tokens",)
    conversational = False
    counts_only = True
    needs_max_tokens = False

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return translate.count_tokens_request(body)

    def count_answer(self, tokens: int) -> bytes:
        return orjson.dumps(translate.tokens_count_object(tokens))


MESSAGES = MessagesWire()
MESSAGES_COUNT_TOKENS = MessagesCountTokensWire()
