"""Chat Completions (`POST /v1/chat/completions`): messages in, a chat.completion or chunk stream out."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BadGateway, InvalidRequest
from proxy.wire import sse
from proxy.wire.adapter import Counter, Endpoint, OpenAIWire
from proxy.wire.content import reply_text

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array of message objects.", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object.", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}.", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, list):
            _check_parts(content, i)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(
                f"'messages[{i}].content' must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"'messages[{i}].name' must be a string.", param=f"messages[{i}].name")


def _check_parts(parts: list, i: int) -> None:
    for j, p in enumerate(parts):
        param = f"messages[{i}].content[{j}]"
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise InvalidRequest(f"'{param}' must be an object with a string 'type'.", param=param)
        if p["type"] == "text" and not isinstance(p.get("text"), str):
            raise InvalidRequest(f"'{param}.text' must be a string.", param=f"{param}.text")


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
            events.append(sse.event(orjson.dumps(chunk)))
    if include_usage and isinstance(answer.get("usage"), dict):
        events.append(sse.event(orjson.dumps({**base, "choices": [], "usage": answer["usage"]})))
    events.append(sse.event(sse.DONE))
    return b"".join(events)


def _contains(content: Any, text: str) -> bool:
    if isinstance(content, str):
        return text in content
    if isinstance(content, list):
        return any(isinstance(p, dict) and text in str(p.get("text", "")) for p in content)
    return False


def appended(content: Any, text: str) -> Any:
    """Message content (a string or parts) with `text` added at its end."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    if not content:
        return text
    return f"{content}\n\n{text}"


def add_instruction(messages: list[dict[str, Any]], text: str, placement: str) -> bool:
    """Add a system instruction to chat messages once, in its place (`system`: a system message first;
    `append_system`: at the end of the first system message; `user`: at the end of the last user message)."""
    if any(_contains(m.get("content"), text) for m in messages):
        return False
    if placement == "append_system":
        for i, m in enumerate(messages):
            if m.get("role") in ("system", "developer"):
                messages[i] = {**m, "content": appended(m.get("content"), text)}
                return True
        placement = "system"
    if placement == "user":
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].get("role") == "user":
                messages[i] = {**messages[i], "content": appended(messages[i].get("content"), text)}
                return True
    messages.insert(0, {"role": "system", "content": text})
    return True


class ChatWire(OpenAIWire):
    endpoint = Endpoint.CHAT
    conversational = True
    paths = ("/v1/chat/completions", "/chat/completions")
    prompt_param = "messages"

    def validate(self, body: dict[str, Any]) -> None:
        if "messages" not in body:
            raise InvalidRequest("'messages' is required.", param="messages")
        _check_messages(body["messages"])
        for defs in ("tools", "functions"):
            value = body.get(defs)
            if value is not None and not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
                raise InvalidRequest(f"'{defs}' must be an array of objects.", param=defs)

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        return counter.chat_prompt(body["messages"], body.get("tools"), body.get("functions")), 1

    def check_reply(self, data: dict[str, Any]) -> None:
        if not isinstance(data.get("choices"), list):
            raise BadGateway("The upstream's reply has no 'choices' list.")

    def reply_text(self, data: dict[str, Any]) -> str:
        return reply_text(data)

    def add_instruction(self, body: dict[str, Any], text: str, placement: str) -> bool:
        return add_instruction(body["messages"], text, placement)

    def asks_plain_text(self, body: dict[str, Any]) -> bool:
        if body.get("n") not in (None, 1) or self.offers_tools(body) or body.get("logprobs"):
            return False
        if self.wants_structured(body):
            return False
        modalities = body.get("modalities")
        return not (isinstance(modalities, list) and any(m != "text" for m in modalities))

    def answer_bytes(
        self, answer: dict[str, Any], stream: bool, include_usage: bool, body: dict[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        if stream and answer.get("object") == "chat.completion":
            return completion_as_events(answer, include_usage), True
        return orjson.dumps(answer), False


CHAT = ChatWire()
