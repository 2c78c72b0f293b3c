"""Anthropic's Messages API over a Chat Completions upstream: a Messages request becomes a chat request, a
chat completion becomes a Message, chat stream chunks become the Messages stream events; errors take
Anthropic's shape.

Pure format code: no I/O, no pipeline. Shapes follow `anthropic.types` (the tests validate every object
built here against the SDK's models). A request to a `provider: anthropic` model is never translated.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from proxy.errors import InvalidRequest, ProxyError
from proxy.wire.sse_events import SSEBuffer, named_event, read_chat
from proxy.wire.usage import is_int

# Messages fields this module maps (or drops: they mean nothing to a chat upstream); any other field is
# passed on untouched, as vendor extensions are.
_MAPPED = frozenset(
    {
        "model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p",
        "tools", "tool_choice", "metadata", "thinking", "service_tier", "container", "mcp_servers",
        "context_management", "output_config", "inference_geo",
    }
)  # fmt: skip

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def new_id(prefix: str = "msg") -> str:
    """An id in Anthropic's style (`msg_…`, `toolu_…`)."""
    return f"{prefix}_{secrets.token_hex(12)}"


# ------------------------------------------------------------------------------------------------ errors


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_object(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_body(error: ProxyError) -> bytes:
    """A ProxyError in Anthropic's error shape; an upstream's OpenAI-shaped error body is re-shaped too."""
    message = error.message
    raw = getattr(error, "raw_body", None)
    if isinstance(raw, bytes):
        message = _upstream_message(raw) or message
    return orjson.dumps(error_object(error.status, message))


def _upstream_message(raw: bytes) -> str | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return None


def error_event(error: ProxyError) -> bytes:
    """A failure after the stream began, as the Messages stream's `error` event."""
    return named_event("error", orjson.loads(error_body(error)))


# ----------------------------------------------------------------------------------------------- request


def _text(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise InvalidRequest(f"{where}.text must be a string", param=f"{where}.text")
    return block["text"]


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise InvalidRequest(f"{where}.source needs media_type and data", param=f"{where}.source")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise InvalidRequest(f"{where}.source must be a base64 or url image source", param=f"{where}.source")


def _document_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") or "application/pdf"
        file = {"file_data": f"data:{media};base64,{source['data']}"}
        if isinstance(block.get("title"), str):
            file["filename"] = block["title"]
        return {"type": "file", "file": file}
    raise InvalidRequest(f"{where}: only text and base64 documents can be translated to chat", param=where)


def _tool_result_content(block: dict[str, Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    """A tool_result's text (for the tool message) and its images (sent after it as a user message)."""
    content = block.get("content")
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of blocks", param=f"{where}.content")
    texts, images = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_text(part, f"{where}.content[{i}]"))
        elif kind == "image":
            images.append(_image_part(part, f"{where}.content[{i}]"))
        else:
            raise InvalidRequest(f"{where}.content[{i}]: block type {kind!r} cannot be a chat tool result")
    return "\n".join(texts), images


def _user_messages(content: list[Any], where: str) -> list[dict[str, Any]]:
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        w = f"{where}[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, w)})
        elif kind == "image":
            parts.append(_image_part(block, w))
        elif kind == "document":
            parts.append(_document_part(block, w))
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidRequest(f"{w}.tool_use_id must be a string", param=f"{w}.tool_use_id")
            text, images = _tool_result_content(block, w)
            if block.get("is_error"):
                text = f"Error: {text}"  # chat has no error flag on a tool message
            tool_messages.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            parts += images
        else:
            raise InvalidRequest(f"{w}: block type {kind!r} cannot be translated to chat", param=w)
    # Chat wants a tool call's results right after the assistant turn that made it, before new user text.
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        user = "\n".join(p["text"] for p in parts) if only_text and len(parts) == 1 else parts
        return [*tool_messages, {"role": "user", "content": user}]
    return tool_messages


def _assistant_message(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        w = f"{where}[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text(block, w))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidRequest(f"{w}: a tool_use block needs id and name", param=w)
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # signed reasoning only means something to Anthropic; a chat model reasons afresh
        else:
            raise InvalidRequest(f"{w}: block type {kind!r} cannot be translated to chat", param=w)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _system_text(system: Any) -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(_text(b, f"system[{i}]") for i, b in enumerate(system) if isinstance(b, dict))
    raise InvalidRequest("system must be a string or a list of text blocks", param="system")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools[{i}] needs a name", param=f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"tools[{i}]: server tool {tool['type']!r} needs a provider: anthropic model", param=f"tools[{i}]"
            )
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise InvalidRequest("tool_choice must be an object", param="tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise InvalidRequest("tool_choice.type must be auto, any, none or tool (with a name)", param="tool_choice")
    if choice.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


def _reasoning_effort(thinking: Any) -> str | None:
    """Extended thinking's token budget as the nearest chat reasoning effort."""
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not is_int(budget):
        return "medium"
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The system prompt and messages of a Messages request as chat messages."""
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"{where}.role must be user or assistant", param=f"{where}.role")
        content = turn.get("content")
        if isinstance(content, str):
            messages.append({"role": turn["role"], "content": content})
        elif not isinstance(content, list):
            raise InvalidRequest(f"{where}.content must be a string or a list of blocks", param=f"{where}.content")
        elif turn["role"] == "user":
            messages += _user_messages(content, f"{where}.content")
        else:
            messages.append(_assistant_message(content, f"{where}.content"))
    return messages


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as the chat request a Chat Completions upstream answers the same way."""
    max_tokens = body.get("max_tokens")
    if not is_int(max_tokens) or max_tokens < 1:
        raise InvalidRequest("max_tokens: a positive integer is required", param="max_tokens")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": chat_messages(body), "max_tokens": max_tokens}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    stop = body.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop_sequences must be a list of strings", param="stop_sequences")
        chat["stop"] = stop
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    if (effort := _reasoning_effort(body.get("thinking"))) is not None:
        chat["reasoning_effort"] = effort
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for key, value in body.items():
        if key not in _MAPPED and key not in chat:
            chat[key] = value
    return chat


def count_tokens_request(body: dict[str, Any]) -> dict[str, Any]:
    """A count_tokens request (a Messages request without max_tokens) as the chat request it counts as."""
    return chat_request({**body, "max_tokens": 1, "stream": False})


def tokens_count_object(count: int) -> dict[str, Any]:
    """The body of `POST /v1/messages/count_tokens`."""
    return {"input_tokens": count}


# ------------------------------------------------------------------------------------------------- reply


def anthropic_usage(usage: Any, input_tokens: int = 0) -> dict[str, Any]:
    """A chat `usage` object in Anthropic's shape: `input_tokens` counts only the uncached prompt tokens."""
    if not isinstance(usage, dict) or not is_int(usage.get("prompt_tokens")):
        return {
            "input_tokens": input_tokens,
            "output_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        }
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    cached = details.get("cached_tokens") if is_int(details.get("cached_tokens")) else 0
    written = details.get("cache_write_tokens") if is_int(details.get("cache_write_tokens")) else 0
    completion = usage.get("completion_tokens")
    return {
        "input_tokens": max(0, usage["prompt_tokens"] - cached - written),
        "output_tokens": completion if is_int(completion) else 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": written,
    }


def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str) and arguments:
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        # A model's malformed arguments are kept for the client to see, not dropped.
        return {"_arguments": arguments}
    return {}


def message_from_chat(completion: dict[str, Any], model: str, message_id: str | None = None) -> dict[str, Any]:
    """A chat.completion as the Message a Messages client expects."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    elif isinstance(message.get("refusal"), str):
        content.append({"type": "text", "text": message["refusal"]})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_id("toolu"),
                "name": fn.get("name") or "",
                "input": _tool_input(fn.get("arguments")),
            }
        )
    return {
        "id": message_id or new_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage")),
    }


# ------------------------------------------------------------------------------------------------ stream


class MessagesStream:
    """Turns a chat-completion SSE stream into the Messages API's stream, run by run.

    `start()` gives `message_start` (with the prompt tokens the proxy counted, as Anthropic reports them
    up front) and a `ping`; `feed(events)` the content block events for a run of chat chunks; `finish()`
    closes the open block and ends with `message_delta` (stop reason, usage) and `message_stop`.
    """

    def __init__(self, model: str, input_tokens: int = 0, message_id: str | None = None):
        self.message_id = message_id or new_id()
        self.model = model
        self.usage: dict[str, Any] | None = None
        self._input_tokens = input_tokens
        self._buffer = SSEBuffer()
        self._index = -1
        self._open: str | None = None  # "text", "thinking" or "tool_use"
        self._calls: dict[int, int] = {}  # chat tool call index -> content block index
        self._stop_reason: str | None = None
        self._finished = False
        self._text_prefix: tuple[int, bytes] = (-1, b"")

    def start(self) -> bytes:
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens, "output_tokens": 0},
        }
        return named_event("message_start", {"type": "message_start", "message": message}) + named_event(
            "ping", {"type": "ping"}
        )

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return named_event("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _begin(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        event = {"type": "content_block_start", "index": self._index, "content_block": block}
        return out + named_event("content_block_start", event)

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        event = {"type": "content_block_delta", "index": self._index if index is None else index, "delta": delta}
        return named_event("content_block_delta", event)

    def _text_delta(self, text: str) -> bytes:
        # Text deltas are most of a stream's events: their fixed part is serialised once per block.
        if self._text_prefix[0] != self._index:
            fixed = orjson.dumps({"type": "content_block_delta", "index": self._index})[:-1]
            self._text_prefix = (
                self._index,
                b"event: content_block_delta\ndata: " + fixed + b',"delta":{"type":"text_delta","text":',
            )
        return self._text_prefix[1] + orjson.dumps(text) + b"}}\n\n"

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        out = b""
        chat_index = call.get("index", 0)
        if chat_index not in self._calls:
            block = {
                "type": "tool_use",
                "id": call.get("id") or new_id("toolu"),
                "name": fn.get("name") or "",
                "input": {},
            }
            out += self._begin("tool_use", block)
            self._calls[chat_index] = self._index
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            # Blocks stream one at a time: a delta for an earlier call (rare) still names its own block.
            out += self._delta({"type": "input_json_delta", "partial_json": arguments}, self._calls[chat_index])
        return out

    def feed(self, events: bytes) -> bytes:
        """The Messages events for a run of chat SSE bytes (a partial event waits for the next run)."""
        usage, deltas = read_chat(self._buffer.feed(events))
        self.usage = usage or self.usage
        out: list[bytes] = []
        for delta in deltas:
            if delta.reasoning:
                if self._open != "thinking":
                    out.append(self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""}))
                out.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning}))
            if delta.text:
                if self._open != "text":
                    out.append(self._begin("text", {"type": "text", "text": ""}))
                out.append(self._text_delta(delta.text))
            out.extend(self._call_delta(call) for call in delta.tool_calls)
            if delta.finish_reason is not None:
                self._stop_reason = _STOP_REASONS.get(delta.finish_reason, "end_turn")
        return b"".join(out)

    def finish(self) -> bytes:
        """The closing events; empty when already finished."""
        if self._finished:
            return b""
        self._finished = True
        out = self.feed(self._buffer.rest() + b"\n\n") + self._close()
        usage = anthropic_usage(self.usage, self._input_tokens)
        delta = {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None}
        out += named_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        return out + named_event("message_stop", {"type": "message_stop"})


def message_as_events(message: dict[str, Any]) -> bytes:
    """A finished Message (e.g. answered from retrieval) as the stream a `stream: true` client expects."""
    usage = message.get("usage") or {}
    stream = MessagesStream(message.get("model") or "", usage.get("input_tokens", 0), message.get("id"))
    out = [stream.start()]
    index = -1
    for block in message.get("content") or ():
        if block.get("type") == "text":
            start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        elif block.get("type") == "tool_use":
            start = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input") or {}).decode()}
        else:
            continue
        index += 1
        out.append(
            named_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        )
        out.append(named_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        out.append(named_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    delta = {"stop_reason": message.get("stop_reason") or "end_turn", "stop_sequence": message.get("stop_sequence")}
    out.append(named_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    out.append(named_event("message_stop", {"type": "message_stop"}))
    return b"".join(out)
