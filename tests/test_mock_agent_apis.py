"""The mock upstream's Responses and Messages APIs, spoken to by the official SDKs directly: the shapes the
proxy's native path forwards (and its tests rely on) are the ones the real APIs send."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message
from openai.types.responses import Response

from proxy.wire.usage import usage_from

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLAUDE_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def oai(mock) -> openai.OpenAI:
    return openai.OpenAI(base_url=mock.url + "/v1", api_key="upstream-key", max_retries=0)


@pytest.fixture
def claude(mock) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock.url, api_key="upstream-key", max_retries=0)


def test_responses_create_stream_and_a_stored_two_turn_conversation(oai, mock):
    first = oai.responses.create(model="mock-big", input="Name a colour.", instructions="Be brief.")
    Response.model_validate(first.model_dump())
    assert first.status == "completed" and first.output_text
    second = oai.responses.create(model="mock-big", input="Another one?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The stored turn came back as history: the prompt grew by the first turn, not by its instructions.
    last = mock.stats()["last_bodies"][-1]
    assert last["previous_response_id"] == first.id
    assert oai.responses.retrieve(first.id).id == first.id
    with oai.responses.stream(model="mock-big", input="Stream please.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.usage.output_tokens > 0
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)


def test_responses_function_tools_call_then_answer(oai):
    call = oai.responses.create(model="mock-big", input="Weather in Paris?", tools=[WEATHER_TOOL])
    item = call.output[0]
    assert item.type == "function_call" and item.name == "get_weather" and item.arguments == '{"city":"Paris"}'
    answer = oai.responses.create(
        model="mock-big",
        previous_response_id=call.id,
        input=[{"type": "function_call_output", "call_id": item.call_id, "output": "18C"}],
        tools=[WEATHER_TOOL],
    )
    assert answer.output[0].type == "message" and answer.output_text


def test_cached_and_reasoning_usage_is_reported_in_every_shape(oai, claude, mock):
    mock.configure(cached_input_tokens=8, cache_write_tokens=4, cache_write_1h_tokens=1, reasoning_tokens=5)
    r = oai.responses.create(model="mock-big", input="A question that is long enough to have a cached prefix.")
    assert r.usage.input_tokens_details.cached_tokens == 8 and r.usage.output_tokens_details.reasoning_tokens == 5
    chat = oai.chat.completions.create(model="mock-big", messages=[{"role": "user", "content": "A long question?"}])
    assert chat.usage.prompt_tokens_details.cached_tokens == 8
    assert chat.usage.completion_tokens_details.reasoning_tokens == 5
    m = claude.messages.create(
        model="claude-x",
        max_tokens=50,
        messages=[{"role": "user", "content": "A question with a long cached prefix of context?"}],
    )
    assert (m.usage.cache_read_input_tokens, m.usage.cache_creation_input_tokens) == (8, 4)
    assert m.usage.cache_creation.ephemeral_1h_input_tokens == 1
    usage = usage_from(m.usage.model_dump())
    assert (usage.cached_input, usage.cache_write, usage.cache_write_1h) == (8, 4, 1)


def test_messages_create_stream_tool_use_and_count_tokens(claude, mock):
    m = claude.messages.create(
        model="claude-x", max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    Message.model_validate(m.model_dump())
    assert m.stop_reason == "end_turn" and m.content[0].type == "text"
    with claude.messages.stream(model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    use = claude.messages.create(
        model="claude-x", max_tokens=100, tools=[CLAUDE_TOOL], messages=[{"role": "user", "content": "Paris?"}]
    )
    assert use.stop_reason == "tool_use" and use.content[0].input == {"city": "Paris"}
    done = claude.messages.create(
        model="claude-x",
        max_tokens=100,
        tools=[CLAUDE_TOOL],
        messages=[
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in use.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.content[0].id, "content": "18C"}]},
        ],
    )
    assert done.stop_reason == "end_turn"
    count = claude.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "Hi"}])
    assert count.input_tokens > 0
    seen = httpx.get(mock.url + "/mock/agent").json()["seen"]
    # The SDK sends its key as x-api-key or (2.x) as a bearer token, and always a version.
    assert "upstream-key" in (seen[-1]["x-api-key"], (seen[-1]["authorization"] or "").removeprefix("Bearer "))
    assert seen[-1]["anthropic-version"] and seen[-1]["path"] == "/v1/messages/count_tokens"


def test_messages_without_a_key_or_max_tokens_get_anthropic_errors(mock):
    r = httpx.post(mock.url + "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        mock.url + "/v1/messages",
        headers={"x-api-key": "k"},
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400 and r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: a positive integer is required"},
    }
