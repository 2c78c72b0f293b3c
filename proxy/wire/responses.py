"""The Responses API over a Chat Completions upstream: a request becomes a chat request, a chat completion
becomes a Response object, and chat stream chunks become the Responses stream events.

Pure format code: no I/O, no pipeline. Shapes follow `openai.types.responses` (the tests validate every
object built here against the SDK's models). A conversation continued with `previous_response_id` arrives
here as the chat messages of the earlier turns (`history`); storing them is the gateway's job.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from proxy.errors import InvalidRequest, ProxyError
from proxy.wire.sse_events import SSEBuffer, named_event, read_chat
from proxy.wire.usage import is_int

# Responses fields this module maps (or deliberately drops); any other field is passed on to the chat
# upstream untouched, as vendor extensions are (vLLM's `top_k`, `chat_template_kwargs`, ...).
_MAPPED = frozenset(
    {
        "model", "input", "instructions", "tools", "tool_choice", "text", "reasoning", "max_output_tokens",
        "stream", "stream_options", "previous_response_id", "store", "include", "truncation", "background",
        "conversation", "prompt", "max_tool_calls", "top_logprobs", "metadata", "safety_identifier",
    }
)  # fmt: skip
_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "service_tier", "prompt_cache_key")
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (`resp_…`, `msg_…`, `fc_…`, `rs_…`)."""
    return f"{prefix}_{secrets.token_hex(24)}"


# ---------------------------------------------------------------------------------------------- request


def _text_of_parts(parts: list[Any], where: str) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text", "refusal"):
            raise InvalidRequest(f"{where}: only text parts can be sent here", param=where)
        texts.append(part.get("text") if part.get("type") != "refusal" else part.get("refusal"))
    return "".join(t for t in texts if isinstance(t, str))


def _content_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}.text must be a string", param=f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise InvalidRequest(
                f"{where}: an input_image needs image_url (file_id needs a native upstream)", param=where
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if isinstance(part.get(k), str)}
        if "file_data" not in file and "file_id" not in file:
            raise InvalidRequest(f"{where}: an input_file needs file_data or file_id", param=where)
        return {"type": "file", "file": file}
    raise InvalidRequest(f"{where}: content type {kind!r} cannot be translated to chat", param=where)


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequest(f"{where}.role must be user, assistant, system or developer", param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": "system" if role == "developer" else role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    if role in ("assistant", "system", "developer"):
        # Chat upstreams take these roles' content as plain text most reliably.
        return {
            "role": "system" if role == "developer" else role,
            "content": _text_of_parts(content, f"{where}.content"),
        }
    return {"role": "user", "content": [_content_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)]}


def _tool_output(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return _text_of_parts(output, where)
    raise InvalidRequest(f"{where} must be a string or a list of text parts", param=where)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """A Responses `input` (a string or a list of items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise InvalidRequest("input must be a string or a list of input items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not (isinstance(name, str) and isinstance(arguments, str) and isinstance(call_id, str)):
                raise InvalidRequest(f"{where}: a function_call needs call_id, name and arguments strings", param=where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls are one assistant turn in chat
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{where}.call_id must be a string", param=f"{where}.call_id")
            output = _tool_output(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # a chat upstream cannot take reasoning back; it reasons afresh
        else:
            raise InvalidRequest(f"{where}: input item type {kind!r} needs an upstream that serves the Responses API")
    return messages


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(
                f"tools[{i}]: only function tools can be translated to chat (got {kind!r})", param=f"tools[{i}]"
            )
        fn = {"name": tool["name"]}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest("tool_choice must be auto, none, required or a function", param="tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("text.format json_schema needs name and schema", param="text.format")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest(f"text.format type {kind!r} is not supported", param="text.format.type")


def chat_request(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Responses request as the chat request a Chat Completions upstream answers the same way."""
    for field in ("background", "conversation", "prompt"):
        if body.get(field):
            raise InvalidRequest(f"{field} needs an upstream that serves the Responses API", param=field)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    # Instructions of earlier turns do not carry over (the API's rule), so history has none of them.
    messages += history or []
    if "input" not in body:
        raise InvalidRequest("input is required", param="input")
    messages += input_messages(body["input"])
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    for key in _PASSED:
        if key in body:
            chat[key] = body[key]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if (fmt := _response_format(body.get("text"))) is not None:
        chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        if reasoning["effort"] not in _EFFORTS:
            raise InvalidRequest(f"reasoning.effort must be one of {sorted(_EFFORTS)}", param="reasoning.effort")
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("max_output_tokens") is not None:
        if not is_int(body["max_output_tokens"]) or body["max_output_tokens"] < 1:
            raise InvalidRequest("max_output_tokens must be a positive integer", param="max_output_tokens")
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("top_logprobs") is not None:
        chat["logprobs"], chat["top_logprobs"] = True, body["top_logprobs"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for key, value in body.items():
        if key not in _MAPPED and key not in _PASSED and key not in chat:
            chat[key] = value
    return chat


# ----------------------------------------------------------------------------------------------- reply


def responses_usage(usage: Any) -> dict[str, Any] | None:
    """A chat `usage` object in the Responses shape."""
    if not isinstance(usage, dict) or not is_int(usage.get("prompt_tokens")):
        return None
    prompt = usage["prompt_tokens"]
    completion = usage.get("completion_tokens") if is_int(usage.get("completion_tokens")) else 0
    pd = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    cd = usage.get("completion_tokens_details") if isinstance(usage.get("completion_tokens_details"), dict) else {}

    def count(details: dict[str, Any], key: str) -> int:
        return details[key] if is_int(details.get(key)) else 0

    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": count(pd, "cached_tokens"),
            "cache_write_tokens": count(pd, "cache_write_tokens"),
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": count(cd, "reasoning_tokens")},
        "total_tokens": prompt + completion,
    }


def _status(finish_reason: Any) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_shell(body: dict[str, Any], response_id: str, model: str, created_at: float) -> dict[str, Any]:
    """A Response object with everything but its output, status and usage: the request's settings echoed."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def _message_item(text: str, refusal: str | None, status: str = "completed") -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": new_id("msg"), "type": "message", "status": status, "role": "assistant", "content": content}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {
        "id": new_id("rs"),
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "status": status,
        "call_id": call.get("id") or new_id("call"),
        "name": fn.get("name") or "",
        "arguments": fn.get("arguments") or "",
    }


def response_from_chat(
    completion: dict[str, Any], body: dict[str, Any], response_id: str | None = None, model: str | None = None
) -> dict[str, Any]:
    """A chat.completion as the Response object of the Responses request `body`."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        output.append(_reasoning_item(reasoning))
    text = message.get("content") if isinstance(message.get("content"), str) else ""
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    if text or refusal:
        output.append(_message_item(text, refusal))
    output += [_call_item(c) for c in message.get("tool_calls") or () if isinstance(c, dict)]
    created = completion.get("created")
    created_at = float(created) if is_int(created) else time.time()
    response = response_shell(body, response_id or new_id("resp"), model or completion.get("model") or "", created_at)
    status, incomplete = _status(choice.get("finish_reason"))
    response.update(status=status, incomplete_details=incomplete, output=output)
    response["usage"] = responses_usage(completion.get("usage"))
    return response


def output_as_chat_message(response: dict[str, Any]) -> dict[str, Any]:
    """A Response's output as the assistant chat message of that turn (what `previous_response_id` replays)."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            text += [p.get("text", "") for p in item.get("content") or () if p.get("type") == "output_text"]
        elif item.get("type") == "function_call":
            fn = {"name": item.get("name"), "arguments": item.get("arguments")}
            calls.append({"id": item.get("call_id"), "type": "function", "function": fn})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def input_tokens_object(count: int) -> dict[str, Any]:
    """The body of `POST /v1/responses/input_tokens`."""
    return {"object": "response.input_tokens", "input_tokens": count}


def error_event(error: ProxyError, sequence_number: int) -> bytes:
    """A failure after the stream began, as the Responses stream's `error` event."""
    data = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "sequence_number": sequence_number,
    }
    return named_event("error", data)


# ---------------------------------------------------------------------------------------------- stream


class _OpenItem:
    __slots__ = ("delta_prefix", "index", "item", "text")

    def __init__(self, item: dict[str, Any], index: int):
        self.item = item
        self.index = index
        self.text: list[str] = []
        self.delta_prefix = b""  # the bytes every delta event of this item starts with (built once)


class ResponsesStream:
    """Turns a chat-completion SSE stream into the Responses API's stream, run by run.

    `start()` gives `response.created` and `response.in_progress`; `feed(events)` the events for a run of
    chat chunks; `finish()` closes every open item and ends with `response.completed` (or
    `response.incomplete` when the answer was cut at max_output_tokens), usage included. `usage` is the
    chat usage seen in the stream, for accounting.
    """

    def __init__(self, body: dict[str, Any], model: str, response_id: str | None = None):
        self.response = response_shell(body, response_id or new_id("resp"), model, time.time())
        self.usage: dict[str, Any] | None = None
        self._seq = 0
        self._buffer = SSEBuffer()
        self._output: list[dict[str, Any]] = []
        self._reasoning: _OpenItem | None = None
        self._message: _OpenItem | None = None
        self._calls: dict[int, _OpenItem] = {}
        self._finish_reason: Any = None
        self._finished = False

    @property
    def sequence_number(self) -> int:
        return self._seq

    def _event(self, kind: str, **data: Any) -> bytes:
        event = named_event(kind, {"type": kind, "sequence_number": self._seq, **data})
        self._seq += 1
        return event

    def start(self) -> bytes:
        return self._event("response.created", response=self.response) + self._event(
            "response.in_progress", response=self.response
        )

    def _open(self, item: dict[str, Any]) -> _OpenItem:
        opened = _OpenItem(item, len(self._output))
        self._output.append(item)
        return opened

    def _open_text(self, kind: str) -> tuple[_OpenItem, bytes]:
        if kind == "reasoning":
            opened = self._open({"id": new_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress"})
            part = {"type": "reasoning_text", "text": ""}
        else:
            opened = self._open(
                {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out = self._event("response.output_item.added", output_index=opened.index, item=opened.item)
        out += self._event(
            "response.content_part.added",
            item_id=opened.item["id"],
            output_index=opened.index,
            content_index=0,
            part=part,
        )
        return opened, out

    def _close_text(self, opened: _OpenItem | None) -> bytes:
        if opened is None:
            return b""
        text = "".join(opened.text)
        item_id, index = opened.item["id"], opened.index
        if opened.item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out = self._event(
                "response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0, text=text
            )
            opened.item.update(content=[part], status="completed")
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out = self._event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            opened.item.update(content=[part], status="completed")
        out += self._event(
            "response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part
        )
        return out + self._event("response.output_item.done", output_index=index, item=opened.item)

    def _close_call(self, opened: _OpenItem) -> bytes:
        arguments = "".join(opened.text)
        opened.item.update(arguments=arguments, status="completed")
        out = self._event(
            "response.function_call_arguments.done",
            item_id=opened.item["id"],
            output_index=opened.index,
            name=opened.item["name"],
            arguments=arguments,
        )
        return out + self._event("response.output_item.done", output_index=opened.index, item=opened.item)

    def _text_delta(self, kind: str, delta: str) -> bytes:
        out = b""
        current = self._reasoning if kind == "reasoning" else self._message
        if current is None:
            if kind == "text":
                out += self._close_text(self._reasoning)  # the answer follows its reasoning
                self._reasoning = None
            current, opened = self._open_text(kind)
            out += opened
            if kind == "reasoning":
                self._reasoning = current
            else:
                self._message = current
        current.text.append(delta)
        if not current.delta_prefix:
            # Deltas are most of a stream's events: their fixed part is serialised once per item.
            name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
            fixed = {"type": name, "item_id": current.item["id"], "output_index": current.index, "content_index": 0}
            if kind == "text":
                fixed["logprobs"] = []
            current.delta_prefix = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(fixed)[:-1] + b',"delta":'
        event = current.delta_prefix + orjson.dumps(delta) + b',"sequence_number":%d}\n\n' % self._seq
        self._seq += 1
        return out + event

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", 0)
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        out = b""
        opened = self._calls.get(index)
        if opened is None:
            out += self._close_text(self._reasoning) + self._close_text(self._message)
            self._reasoning = self._message = None
            item = _call_item({"id": call.get("id"), "function": {"name": fn.get("name")}}, status="in_progress")
            opened = self._calls[index] = self._open(item)
            out += self._event("response.output_item.added", output_index=opened.index, item=item)
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            opened.text.append(arguments)
            out += self._event(
                "response.function_call_arguments.delta",
                item_id=opened.item["id"],
                output_index=opened.index,
                delta=arguments,
            )
        return out

    def feed(self, events: bytes) -> bytes:
        """The Responses events for a run of chat SSE bytes (a partial event waits for the next run)."""
        usage, deltas = read_chat(self._buffer.feed(events))
        self.usage = usage or self.usage
        out: list[bytes] = []
        for delta in deltas:
            if delta.reasoning:
                out.append(self._text_delta("reasoning", delta.reasoning))
            if delta.text:
                out.append(self._text_delta("text", delta.text))
            out.extend(self._call_delta(call) for call in delta.tool_calls)
            if delta.finish_reason is not None:
                self._finish_reason = delta.finish_reason
        return b"".join(out)

    def finish(self) -> bytes:
        """The closing events; empty when already finished."""
        if self._finished:
            return b""
        self._finished = True
        out = self.feed(self._buffer.rest() + b"\n\n")
        out += self._close_text(self._reasoning) + self._close_text(self._message)
        for opened in self._calls.values():
            out += self._close_call(opened)
        status, incomplete = _status(self._finish_reason)
        self.response.update(
            status=status, incomplete_details=incomplete, output=self._output, usage=responses_usage(self.usage)
        )
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, response=self.response)


def response_as_events(response: dict[str, Any]) -> bytes:
    """A finished Response (e.g. answered from retrieval) as the stream a `stream: true` client expects."""
    stream = ResponsesStream({}, response.get("model") or "", response["id"])
    stream.response = {**response, "status": "in_progress", "output": [], "usage": None}
    out = [stream.start()]
    for index, item in enumerate(response.get("output") or ()):
        out.append(
            stream._event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
        )
        for c, part in enumerate(item.get("content") or () if item.get("type") == "message" else ()):
            where = {"item_id": item["id"], "output_index": index, "content_index": c}
            empty = {**part, "text": ""} if part.get("type") == "output_text" else {**part, "refusal": ""}
            out.append(stream._event("response.content_part.added", **where, part=empty))
            if part.get("type") == "output_text":
                out.append(stream._event("response.output_text.delta", **where, delta=part["text"], logprobs=[]))
                out.append(stream._event("response.output_text.done", **where, text=part["text"], logprobs=[]))
            out.append(stream._event("response.content_part.done", **where, part=part))
        out.append(stream._event("response.output_item.done", output_index=index, item=item))
    kind = "response.completed" if response.get("status") == "completed" else "response.incomplete"
    out.append(stream._event(kind, response=response))
    return b"".join(out)
