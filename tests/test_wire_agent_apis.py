"""The Responses and Messages translators over chat: every object and stream event they build is validated
against the official SDK's models (`openai.types.responses`, `anthropic.types`), and a stream's events
add up to the same answer as the non-stream reply."""

from __future__ import annotations

import orjson
import pytest
from anthropic.types import ErrorResponse, Message, MessageTokensCount, RawMessageStreamEvent
from openai.types.responses import InputTokenCountResponse, Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.errors import BudgetExceeded, InvalidRequest, Unauthorized, UpstreamHTTPError
from proxy.wire import anthropic as messages_wire
from proxy.wire import responses as responses_wire
from proxy.wire.usage import usage_from

RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)
MESSAGE_EVENT = TypeAdapter(RawMessageStreamEvent)

CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 128},
}


def _completion(message: dict, finish_reason: str = "stop") -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "small",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}],
        "usage": CHAT_USAGE,
    }


def _sse(chunks: list[dict]) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "small"}
    out = b"".join(b"data: " + orjson.dumps({**base, **c}) + b"\n\n" for c in chunks)
    return out + b"data: [DONE]\n\n"


def _delta(delta: dict, finish_reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


TEXT_STREAM = [
    _delta({"role": "assistant", "content": ""}),
    _delta({"content": "Hello"}),
    _delta({"content": ", world"}),
    _delta({}, "stop"),
    {"choices": [], "usage": CHAT_USAGE},
]

TOOL_STREAM = [
    _delta({"role": "assistant", "content": None}),
    _delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _delta({}, "tool_calls"),
    {"choices": [], "usage": CHAT_USAGE},
]


def _events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


def _split_feed(stream, raw: bytes, step: int = 7) -> bytes:
    # Upstreams split events across reads: feed odd-sized pieces.
    return b"".join(stream.feed(raw[i : i + step]) for i in range(0, len(raw), step))


# ---------------------------------------------------------------------------------------------- responses


def test_responses_request_with_instructions_items_tools_and_schema_becomes_a_chat_request():
    body = {
        "model": "gpt-4o",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
        "reasoning": {"effort": "low"},
        "max_output_tokens": 200,
        "temperature": 0.2,
        "top_k": 5,  # a vendor extension passes through
        "store": True,
        "stream": True,
    }
    chat = responses_wire.chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
    ]
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    assert (chat["reasoning_effort"], chat["max_tokens"], chat["temperature"], chat["top_k"]) == ("low", 200, 0.2, 5)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert "store" not in chat and "input" not in chat and "instructions" not in chat


def test_a_string_input_after_history_continues_the_conversation():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    chat = responses_wire.chat_request({"model": "m", "input": "And you?", "instructions": "Kind."}, history)
    assert chat["messages"] == [
        {"role": "system", "content": "Kind."},
        *history,
        {"role": "user", "content": "And you?"},
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m"}, "input is required"),
        ({"model": "m", "input": 3}, "input must be a string"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "only function tools"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "needs an upstream that serves"),
        ({"model": "m", "input": "x", "background": True}, "background needs"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort"),
    ],
)
def test_bad_responses_requests_are_400s(body, message):
    with pytest.raises(InvalidRequest, match=message):
        responses_wire.chat_request(body)


def test_a_chat_completion_becomes_a_response_with_usage_details():
    body = {"model": "gpt-4o", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 50}
    completion = _completion({"content": "Hello", "reasoning_content": "thinking..."})
    response = Response.model_validate(responses_wire.response_from_chat(completion, body, model="gpt-4o"))
    assert response.output_text == "Hello" and response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.instructions == "Be brief." and response.max_output_tokens == 50 and response.model == "gpt-4o"
    assert response.usage.input_tokens_details.cached_tokens == 1024
    assert response.usage.output_tokens_details.reasoning_tokens == 128
    assert usage_from(response.usage.model_dump()) == usage_from(CHAT_USAGE)


def test_tool_calls_become_function_call_items_and_length_is_incomplete():
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    r = Response.model_validate(responses_wire.response_from_chat(_completion({"tool_calls": [call]}), {"input": "x"}))
    assert (
        r.output[0].type == "function_call" and r.output[0].call_id == "call_9" and r.output[0].arguments == '{"a":1}'
    )
    cut = Response.model_validate(responses_wire.response_from_chat(_completion({"content": "Hel"}, "length"), {}))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    # The turn replays as the chat assistant message the next request's history starts from.
    assert responses_wire.output_as_chat_message(r.model_dump()) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [call],
    }


def _responses_stream(chunks: list[dict], body: dict | None = None) -> tuple[list[tuple[str, dict]], dict]:
    stream = responses_wire.ResponsesStream(body or {"model": "gpt-4o", "input": "hi"}, "gpt-4o")
    raw = stream.start() + _split_feed(stream, _sse(chunks)) + stream.finish()
    assert stream.finish() == b""
    events = _events(raw)
    for name, data in events:
        assert RESPONSE_EVENT.validate_python(data).type == name
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    return events, stream.usage


def test_a_chat_text_stream_becomes_the_responses_event_sequence():
    events, usage = _responses_stream(TEXT_STREAM)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert usage == CHAT_USAGE
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == "Hello, world" and final.usage.input_tokens == 1200
    assert final.usage.input_tokens_details.cached_tokens == 1024


def test_a_chat_tool_call_stream_becomes_function_call_argument_events():
    events, _ = _responses_stream(TOOL_STREAM)
    names = [name for name, _ in events]
    assert names[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = dict(events)["response.function_call_arguments.done"]
    assert done["arguments"] == '{"city": "Paris"}' and done["name"] == "get_weather"
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output[0].call_id == "call_1" and final.output[0].arguments == '{"city": "Paris"}'


def test_a_stored_response_streams_as_the_same_events():
    response = responses_wire.response_from_chat(_completion({"content": "Paris."}), {"input": "Capital?"}, model="m")
    events = _events(responses_wire.response_as_events(response))
    for name, data in events:
        assert RESPONSE_EVENT.validate_python(data).type == name
    assert Response.model_validate(events[-1][1]["response"]).output_text == "Paris."
    assert InputTokenCountResponse.model_validate(responses_wire.input_tokens_object(12)).input_tokens == 12


def test_an_error_mid_stream_is_a_responses_error_event():
    events = _events(responses_wire.error_event(BudgetExceeded("over budget"), 7))
    assert RESPONSE_EVENT.validate_python(events[0][1]).message == "over budget"


# ----------------------------------------------------------------------------------------------- messages


def test_a_messages_request_with_blocks_tools_and_tool_results_becomes_a_chat_request():
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image, and the weather?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        "stop_sequences": ["\n\nHuman:"],
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    chat = messages_wire.chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image, and the weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "user", "content": "Thanks"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}, "description": "Weather"},
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert (chat["max_tokens"], chat["stop"], chat["reasoning_effort"], chat["user"]) == (
        512,
        ["\n\nHuman:"],
        "low",
        "u-1",
    )
    assert chat["stream_options"] == {"include_usage": True}
    assert "system" not in chat and "thinking" not in chat and "metadata" not in chat


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages must be a non-empty list"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role must be user"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "server tool",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            "source",
        ),
    ],
)
def test_bad_messages_requests_are_400s(body, message):
    with pytest.raises(InvalidRequest, match=message):
        messages_wire.chat_request(body)


def test_a_chat_completion_becomes_a_message_with_anthropic_usage():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    raw = messages_wire.message_from_chat(
        _completion({"content": "Checking.", "tool_calls": [call]}, "tool_calls"), "claude"
    )
    message = Message.model_validate(raw)
    assert message.stop_reason == "tool_use" and message.model == "claude"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"city": "Paris"} and message.content[1].id == "call_1"
    # Anthropic counts only uncached prompt tokens as input_tokens; the total is the same.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (176, 1024)
    assert usage_from(message.usage.model_dump()).input == 1200
    for finish, stop in [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")]:
        raw = messages_wire.message_from_chat(_completion({"content": "x"}, finish), "claude")
        assert Message.model_validate(raw).stop_reason == stop


def _messages_stream(chunks: list[dict]) -> list[tuple[str, dict]]:
    stream = messages_wire.MessagesStream("claude", input_tokens=1200)
    raw = stream.start() + _split_feed(stream, _sse(chunks)) + stream.finish()
    events = _events(raw)
    for name, data in events:
        if name != "ping":
            assert MESSAGE_EVENT.validate_python(data).type == name
    return events


def test_a_chat_text_stream_becomes_the_messages_event_sequence():
    events = _messages_stream(TEXT_STREAM)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello, world"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"] == {
        "input_tokens": 176,
        "output_tokens": 300,
        "cache_read_input_tokens": 1024,
        "cache_creation_input_tokens": 0,
    }


def test_a_chat_tool_call_stream_becomes_tool_use_blocks():
    events = _messages_stream(TOOL_STREAM)
    starts = [d for n, d in events if n == "content_block_start"]
    assert starts == [
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
        }
    ]
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta")
    assert orjson.loads(partial) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_finished_message_streams_as_the_same_events():
    message = messages_wire.message_from_chat(_completion({"content": "Paris."}), "claude")
    events = _events(messages_wire.message_as_events(message))
    for name, data in events:
        if name != "ping":
            MESSAGE_EVENT.validate_python(data)
    assert "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta") == "Paris."


def test_errors_take_anthropics_shape_and_status_type():
    for error, kind in [
        (InvalidRequest("bad"), "invalid_request_error"),
        (Unauthorized("no key"), "authentication_error"),
        (BudgetExceeded("over"), "rate_limit_error"),
    ]:
        body = ErrorResponse.model_validate(orjson.loads(messages_wire.error_body(error)))
        assert body.error.type == kind and body.error.message == error.message
    upstream = UpstreamHTTPError(503, orjson.dumps({"error": {"message": "overloaded", "type": "server_error"}}))
    body = ErrorResponse.model_validate(orjson.loads(messages_wire.error_body(upstream)))
    assert (body.error.type, body.error.message) == ("api_error", "overloaded")
    assert MessageTokensCount.model_validate(messages_wire.tokens_count_object(42)).input_tokens == 42
    assert messages_wire.count_tokens_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})[
        "messages"
    ] == [{"role": "user", "content": "hi"}]


REASONING_STREAM = [
    _delta({"role": "assistant", "reasoning_content": "Think"}),
    _delta({"reasoning_content": "ing."}),
    _delta({"content": "Answer"}),
    _delta({}, "length"),
    {"choices": [], "usage": CHAT_USAGE},
]


def test_reasoning_deltas_stream_as_reasoning_items_and_thinking_blocks():
    events, _ = _responses_stream(REASONING_STREAM)
    final = Response.model_validate(events[-1][1]["response"])
    assert events[-1][0] == "response.incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Thinking." and final.output_text == "Answer"
    blocks = [d["content_block"]["type"] for n, d in _messages_stream(REASONING_STREAM) if n == "content_block_start"]
    assert blocks == ["thinking", "text"]
    assert _messages_stream(REASONING_STREAM)[-2][1]["delta"]["stop_reason"] == "max_tokens"


# --------------------------------------------------------------- the adapters: answers the proxy makes itself

RETRIEVAL_ANSWER = {
    "id": "chatcmpl-kb",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "big",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_retrieval_answer_goes_back_as_a_response_or_a_message(stream):
    from proxy.wire.messages_api import MESSAGES
    from proxy.wire.responses_api import RESPONSES

    body, is_sse = RESPONSES.answer_bytes(RETRIEVAL_ANSWER, stream, False, {"model": "big", "input": "Capital?"})
    assert is_sse == stream
    if stream:
        events = [TypeAdapter(ResponseStreamEvent).validate_json(p) for p in _payloads(body)]
        assert events[-1].type == "response.completed" and events[-1].response.output_text == "Paris."
    else:
        assert Response.model_validate_json(body).output_text == "Paris."
    body, is_sse = MESSAGES.answer_bytes(RETRIEVAL_ANSWER, stream, False, {"model": "big"})
    assert is_sse == stream
    if stream:
        # `ping` is a keep-alive the SDK skips; every other event is one of the SDK's stream events.
        events = [TypeAdapter(RawMessageStreamEvent).validate_json(p) for p in _payloads(body) if b'"ping"' not in p]
        assert [e.type for e in events][-1] == "message_stop"
        assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "Paris."
    else:
        assert Message.model_validate_json(body).content[0].text == "Paris."


def test_concise_goes_into_instructions_or_system_once():
    from proxy.wire.messages_api import MESSAGES
    from proxy.wire.responses_api import RESPONSES

    body = {"model": "m", "input": "Hi"}
    assert RESPONSES.add_instruction(body, "Be concise.", "system") and body["instructions"] == "Be concise."
    assert not RESPONSES.add_instruction(body, "Be concise.", "system")
    cached = {"type": "text", "text": "prefix", "cache_control": {"type": "ephemeral"}}
    body = {"model": "m", "max_tokens": 5, "system": [cached], "messages": [{"role": "user", "content": "Hi"}]}
    assert MESSAGES.add_instruction(body, "Be concise.", "system")
    assert body["system"] == [cached, {"type": "text", "text": "Be concise."}]
    assert not MESSAGES.add_instruction(body, "Be concise.", "system")


def _payloads(events: bytes) -> list[bytes]:
    return [line[6:] for line in events.split(b"\n") if line.startswith(b"data: ")]
