"""The mock upstream's agent APIs: OpenAI's Responses API (`/v1/responses`, stored responses, input_tokens),
Anthropic's Messages API (`/v1/messages`, streams, `count_tokens`), function / tool_use calls on chat too,
and usage that reports cached, cache-write and reasoning tokens when `/mock/config` asks for them.

Keys set through `POST /mock/config`: `cached_input_tokens`, `cache_write_tokens`, `cache_write_1h_tokens`
(Anthropic's 1-hour TTL, part of the writes) and `reasoning_tokens` (added to every answer's output).
A request that offers tools gets a call to its first tool until the conversation holds a tool result;
then a text answer. `GET /mock/agent` tells the auth headers and versions each path was called with;
`/mock/reset` clears it all.
Replies are built with the proxy's own wire translators over a chat answer and are checked by the tests
against the official SDKs' models, which are the ground truth for both.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import InvalidRequest
from proxy.wire import anthropic as messages_wire
from proxy.wire import responses as responses_wire

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_SETTINGS = ("cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens")


@dataclass
class AgentSettings:
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # response id -> response + its messages
    seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _openai_error(status: int, message: str) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}, status)


def _has_tool_result(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" for m in messages)


def _arguments(tool: dict[str, Any]) -> str:
    """Arguments for a tool call: every required string property set to "Paris" (deterministic)."""
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else {}
    schema = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else list(props)
    return orjson.dumps({str(name): "Paris" for name in required}).decode()


class AgentAPIs:
    def __init__(self, mock: Any, reply_text: Callable[[str, int], str], prompt_text: Callable[[dict], str]):
        self.mock = mock  # the MockUpstream serving chat (its token counter, lengths, usage)
        self._reply_text = reply_text
        self._prompt_text = prompt_text
        self.settings = AgentSettings()

    # --------------------------------------------------------------------------------------- the chat core

    def _usage(self, prompt: int, completion: int) -> dict[str, Any]:
        """A chat usage object with the details OpenAI reports, cached and reasoning tokens as configured."""
        s = self.settings
        cached = min(s.cached_input_tokens, prompt)
        written = min(s.cache_write_tokens, prompt - cached)
        completion += s.reasoning_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": s.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _completion(self, chat: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The mock's chat completion for a chat request, and its prompt tokens."""
        messages = chat["messages"]
        prompt = self.mock._counter.chat_prompt(messages, chat.get("tools"))
        # Only well-formed function tools get calls (a fuzzed body must not crash the mock).
        tools = [
            t
            for t in chat.get("tools") or ()
            if isinstance(t, dict)
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
        ]
        created = int(time.time())
        if tools and chat.get("tool_choice") != "none" and not _has_tool_result(messages):
            tool = tools[0]
            choice = chat.get("tool_choice")
            if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
                wanted = choice["function"].get("name")
                tool = next((t for t in tools if t["function"]["name"] == wanted), tool)
            arguments = _arguments(tool)
            call = {
                "id": f"call_{created}",
                "type": "function",
                "function": {"name": tool["function"]["name"], "arguments": arguments},
            }
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish, completion_tokens = "tool_calls", self.mock._counter.text(tool["function"]["name"] + arguments)
        else:
            text = self._reply_text(self._prompt_text(chat), self.mock._n_words(chat))
            message, finish, completion_tokens = (
                {"role": "assistant", "content": text},
                "stop",
                self.mock._counter.text(text),
            )
            limit = chat.get("max_tokens")
            if isinstance(limit, int) and completion_tokens >= limit:
                finish = "length"
        reply = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": created,
            "model": chat.get("model") or "mock",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if self.mock.state.usage:
            reply["usage"] = self._usage(prompt, completion_tokens)
        return reply, prompt

    @staticmethod
    def _chunks(completion: dict[str, Any]) -> bytes:
        """A chat completion as the chat SSE stream (one delta per word or argument piece, then usage)."""
        base = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        choice = completion["choices"][0]
        message = choice["message"]
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if message.get("content"):
            words = message["content"].split(" ")
            deltas += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        for i, call in enumerate(message.get("tool_calls") or ()):
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            deltas.append({"tool_calls": [head]})
            args = call["function"]["arguments"]
            deltas += [
                {"tool_calls": [{"index": i, "function": {"arguments": args[j : j + 8]}}]}
                for j in range(0, len(args), 8)
            ]
        events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
        if "usage" in completion:
            events.append({**base, "choices": [], "usage": completion["usage"]})
        return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    def _seen(self, request: web.Request) -> None:
        h = request.headers
        self.settings.seen.append(
            {
                "path": request.path,
                "x-api-key": h.get("x-api-key"),
                "authorization": h.get("authorization"),
                "anthropic-version": h.get("anthropic-version"),
            }
        )

    async def _stream(self, request: web.Request, events: bytes, prompt: int, completion: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if await self.mock._client_gone(request):
            return resp
        await resp.prepare(request)
        for event in events.split(b"\n\n"):
            if event:
                await resp.write(event + b"\n\n")
                if self.mock.state.chunk_delay_s:
                    await asyncio.sleep(self.mock.state.chunk_delay_s)
        self.mock._served(prompt, completion)
        await resp.write_eof()
        return resp

    @staticmethod
    def _completion_tokens(completion: dict[str, Any]) -> int:
        return (completion.get("usage") or {}).get("completion_tokens", 0)

    # -------------------------------------------------------------------------------------- chat with tools

    async def chat_with_tools(self, request: web.Request) -> web.StreamResponse:
        """Chat requests that offer tools (the plain chat handler answers the rest)."""
        body, _, early = await self.mock._begin(request)
        if early is not None:
            return early
        completion, prompt = self._completion(body)
        if body.get("stream"):
            events = self._chunks(completion)
            if not (body.get("stream_options") or {}).get("include_usage"):
                events = b"".join(e + b"\n\n" for e in events.split(b"\n\n") if e and b'"usage"' not in e)
            return await self._stream(request, events, prompt, self._completion_tokens(completion))
        return await self.mock._deliver(request, completion, prompt, self._completion_tokens(completion))

    # ---------------------------------------------------------------------------------------- responses

    async def responses(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        body, _, early = await self.mock._begin(request)
        if early is not None:
            return early
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            stored = self.settings.stored.get(previous)
            if stored is None:
                return _openai_error(404, f"Previous response with id '{previous}' not found.")
            history = stored["messages"]
        try:
            chat = responses_wire.chat_request({**body, "stream": False}, history)
        except InvalidRequest as e:
            return _openai_error(400, e.message)
        completion, prompt = self._completion(chat)
        response_id = responses_wire.new_id("resp")
        model = body.get("model") or "mock"
        response = responses_wire.response_from_chat(completion, body, response_id, model)
        if body.get("store", True):
            # Instructions do not carry over to the next turn (the API's rule): the first system message goes.
            turn = chat["messages"][1:] if body.get("instructions") is not None else chat["messages"]
            messages = [*turn, responses_wire.output_as_chat_message(response)]
            self.settings.stored[response_id] = {"response": response, "messages": messages}
        if body.get("stream"):
            stream = responses_wire.ResponsesStream(body, model, response_id)
            events = stream.start() + stream.feed(self._chunks(completion)) + stream.finish()
            return await self._stream(request, events, prompt, self._completion_tokens(completion))
        return await self.mock._deliver(request, response, prompt, self._completion_tokens(completion))

    async def get_response(self, request: web.Request) -> web.Response:
        stored = self.settings.stored.get(request.match_info["response_id"])
        if stored is None:
            return _openai_error(404, f"No response found with id '{request.match_info['response_id']}'.")
        return _json(stored["response"])

    async def delete_response(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        if self.settings.stored.pop(response_id, None) is None:
            return _openai_error(404, f"No response found with id '{response_id}'.")
        return _json({"id": response_id, "object": "response", "deleted": True})

    async def input_tokens(self, request: web.Request) -> web.Response:
        body = await request.json(loads=orjson.loads)
        self.mock.state.calls[request.path] += 1
        try:
            chat = responses_wire.chat_request({**body, "stream": False})
        except InvalidRequest as e:
            return _openai_error(400, e.message)
        count = self.mock._counter.chat_prompt(chat["messages"], chat.get("tools"))
        return _json(responses_wire.input_tokens_object(count))

    # ------------------------------------------------------------------------------------------ messages

    def _anthropic_usage(self, prompt: int, completion: int) -> dict[str, Any]:
        s = self.settings
        read = min(s.cached_input_tokens, prompt)
        written = min(s.cache_write_tokens, prompt - read)
        written_1h = min(s.cache_write_1h_tokens, written)
        return {
            "input_tokens": prompt - read - written,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": written,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written - written_1h,
                "ephemeral_1h_input_tokens": written_1h,
            },
            "output_tokens": completion,
            "service_tier": "standard",
        }

    @staticmethod
    def _anthropic_error(status: int, message: str) -> web.Response:
        return _json(messages_wire.error_object(status, message), status)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        if not request.headers.get("x-api-key") and not request.headers.get("authorization"):
            return self._anthropic_error(401, "x-api-key header is required")
        body, _, early = await self.mock._begin(request)
        if early is not None:
            return early
        try:
            chat = messages_wire.chat_request({**body, "stream": False})
        except InvalidRequest as e:
            return self._anthropic_error(400, e.message)
        completion, prompt = self._completion(chat)
        completion_tokens = self._completion_tokens(completion)
        model = body.get("model") or "mock"
        message = messages_wire.message_from_chat(completion, model)
        usage = self._anthropic_usage(prompt, completion_tokens)
        message["usage"] = usage
        if body.get("stream"):
            events = []
            for event in messages_wire.message_as_events(message).split(b"\n\n"):
                if event.startswith(b"event: message_start"):
                    # Anthropic reports the prompt's usage up front and the output in message_delta.
                    name, data = event.split(b"\ndata: ", 1)
                    start = orjson.loads(data)
                    start["message"]["usage"] = {**usage, "output_tokens": 1}
                    event = name + b"\ndata: " + orjson.dumps(start)
                if event:
                    events.append(event + b"\n\n")
            return await self._stream(request, b"".join(events), prompt, completion_tokens)
        return await self.mock._deliver(request, message, prompt, completion_tokens)

    async def count_tokens(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json(loads=orjson.loads)
        self.mock.state.calls[request.path] += 1
        try:
            chat = messages_wire.count_tokens_request(body)
        except InvalidRequest as e:
            return self._anthropic_error(400, e.message)
        count = self.mock._counter.chat_prompt(chat["messages"], chat.get("tools"))
        return _json(messages_wire.tokens_count_object(count))

    # -------------------------------------------------------------------------------------------- control

    async def agent_stats(self, request: web.Request) -> web.Response:
        return _json({"seen": list(self.settings.seen), "stored_responses": len(self.settings.stored)})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/mock/config":
            cfg = await request.json(loads=orjson.loads)  # aiohttp keeps the body: the handler reads it again
            for key in _SETTINGS:
                if key in cfg:
                    setattr(self.settings, key, int(cfg[key]))
        elif request.method == "POST" and request.path == "/mock/reset":
            self.settings = AgentSettings()
        elif request.method == "POST" and request.path in _CHAT_PATHS:
            body = await request.json(loads=orjson.loads)
            if isinstance(body, dict) and body.get("tools"):
                return await self.chat_with_tools(request)
        return await handler(request)


def register_agent_apis(
    app: web.Application, mock: Any, reply_text: Callable[[str, int], str], prompt_text: Callable[[dict], str]
) -> AgentAPIs:
    """Serve the Responses and Messages APIs (and tool calls on chat) from the mock `app`, with the mock's
    own way of making a reply's text from a prompt."""
    agent = AgentAPIs(mock, reply_text, prompt_text)
    # Chat answers report cached and reasoning tokens too, as configured.
    mock._usage = agent._usage  # type: ignore[method-assign]
    app.middlewares.append(agent.middleware)
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/responses", agent.responses)
        app.router.add_post(f"{prefix}/responses/input_tokens", agent.input_tokens)
        app.router.add_get(f"{prefix}/responses/{{response_id}}", agent.get_response)
        app.router.add_delete(f"{prefix}/responses/{{response_id}}", agent.delete_response)
        app.router.add_post(f"{prefix}/messages", agent.messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", agent.count_tokens)
    app.router.add_get("/mock/agent", agent.agent_stats)
    return agent
