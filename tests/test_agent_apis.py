"""The APIs agents speak, through the real proxy: OpenAI's Responses API and Anthropic's Messages API, each to
an upstream that speaks it (forwarded natively) and to a Chat Completions upstream (translated both ways),
driven by the official `openai` and `anthropic` SDKs. Budgets, policies, exact cost with cached and
reasoning tokens, and bad input in each API's own error shape."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message
from openai.types.responses import Response

from tests.conftest import MASTER_KEY, MockUpstream, Server, start_proxy

KEYS = {"alpha": "sk-agents-alpha", "beta": "sk-agents-beta", "poor": "sk-agents-poor"}
# USD per million tokens, as in the policy below.
PRICES = {
    "gpt-resp": {"input": 2.0, "output": 8.0, "cached": 0.5},
    "chat-big": {"input": 2.5, "output": 10.0, "cached": 1.25, "reasoning": 12.0},
    "chat-small": {"input": 0.15, "output": 0.6, "cached": 0.075},
    "claude": {"input": 3.0, "output": 15.0, "cached": 0.3, "write": 3.75, "write_1h": 6.0},
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLAUDE_WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
RESPONSES_MODELS = ["gpt-resp", "chat-big"]  # native, translated
MESSAGES_MODELS = ["claude", "chat-big"]


def _policy(mock_url: str) -> str:
    beta = hashlib.sha256(KEYS["beta"].encode()).hexdigest()
    return textwrap.dedent(
        f"""\
        version: 1
        models:
          gpt-resp:
            api_base: {mock_url}/v1
            upstream_model: mock-resp
            api: responses
            price: {{input_per_mtok: 2, output_per_mtok: 8, cached_input_per_mtok: 0.5}}
          chat-big:
            api_base: {mock_url}/v1
            upstream_model: mock-big
            price: {{input_per_mtok: 2.5, output_per_mtok: 10, cached_input_per_mtok: 1.25, reasoning_per_mtok: 12}}
          chat-small:
            api_base: {mock_url}/v1
            upstream_model: mock-small
            price: {{input_per_mtok: 0.15, output_per_mtok: 0.6, cached_input_per_mtok: 0.075}}
          claude:
            provider: anthropic
            api_base: {mock_url}
            api_key: upstream-anthropic-key
            upstream_model: claude-sonnet-4-5
            price: {{input_per_mtok: 3, output_per_mtok: 15, cached_input_per_mtok: 0.3,
                     cache_write_per_mtok: 3.75, cache_write_1h_per_mtok: 6}}
        teams:
          alpha:
            keys: [{KEYS["alpha"]}]
          beta:
            keys: [sha256:{beta}]
            models: [chat-small]
          poor:
            keys: [{KEYS["poor"]}]
            budget: {{usd: 0.0001, period: day}}
        policies:
          - name: to-small
            when: {{headers: {{x-test-route: "1"}}}}
            route: {{to: chat-small}}
          - name: be-concise
            when: {{headers: {{x-test-concise: "1"}}}}
            concise: {{instruction: "Answer in one sentence.", holdout: 0, skip_tools: false}}
        """
    )


@pytest.fixture(scope="module")
def agents_proxy(session_tmp: Path, mock_upstream: MockUpstream) -> Iterator[Server]:
    server = start_proxy(session_tmp, _policy(mock_upstream.url))
    yield server
    server.stop()


def oai(server: Server, team: str = "alpha", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[team], max_retries=0, **kw)


def claude(server: Server, team: str = "alpha", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEYS[team], max_retries=0, **kw)


def spend(server: Server, team: str = "alpha") -> float:
    r = httpx.get(server.url + "/admin/spend", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    return r.json()["teams"].get(team, {}).get("spend_usd", 0.0)


def upstream_path(mock: MockUpstream, model: str) -> str:
    """The mock path a request for `model` reached: natively, or translated to chat."""
    return "/v1/responses" if model == "gpt-resp" else "/v1/chat/completions"


def _per_mtok(tokens: int, usd: float) -> float:
    return tokens * usd / 1e6


# ------------------------------------------------------------------------------------------- Responses


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_responses_create_through_the_proxy(agents_proxy, mock, model):
    raw = oai(agents_proxy).responses.with_raw_response.create(
        model=model, input="What is a proxy?", instructions="You are a guide."
    )
    r = raw.parse()
    Response.model_validate(r.model_dump())
    assert r.status == "completed" and len(r.output_text.split()) == 32
    assert raw.headers["x-llm-proxy-model"] == model
    assert mock.calls(upstream_path(mock, model)) == 1
    sent = mock.stats()["last_bodies"][-1]
    if model == "gpt-resp":  # forwarded as it came, the model rewritten
        assert (
            sent["input"] == "What is a proxy?"
            and sent["instructions"] == "You are a guide."
            and sent["model"] == "mock-resp"
        )
    else:  # translated to chat
        assert sent["model"] == "mock-big"
        assert sent["messages"] == [
            {"role": "system", "content": "You are a guide."},
            {"role": "user", "content": "What is a proxy?"},
        ]
    cost = _per_mtok(r.usage.input_tokens, PRICES[model]["input"]) + _per_mtok(
        r.usage.output_tokens, PRICES[model]["output"]
    )
    assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(cost, abs=1e-9)


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_responses_stream_event_by_event_with_usage_from_the_final_event(agents_proxy, mock, model):
    before = spend(agents_proxy)
    with oai(agents_proxy).responses.stream(model=model, input="Stream please.") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 32
    assert len(final.output_text.split()) == 32 and final.usage.output_tokens == 32
    cost = _per_mtok(final.usage.input_tokens, PRICES[model]["input"]) + _per_mtok(32, PRICES[model]["output"])
    assert spend(agents_proxy) - before == pytest.approx(cost, abs=1e-9)
    assert mock.calls(upstream_path(mock, model)) == 1


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_responses_function_tools_call_then_answer(agents_proxy, mock, model):
    client = oai(agents_proxy)
    call = client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER])
    item = call.output[0]
    assert item.type == "function_call" and item.name == "get_weather" and item.arguments == '{"city":"Paris"}'
    answer = client.responses.create(
        model=model,
        previous_response_id=call.id,
        input=[{"type": "function_call_output", "call_id": item.call_id, "output": "18C"}],
        tools=[WEATHER],
    )
    assert answer.output[0].type == "message" and answer.output_text
    if model == "chat-big":  # the kept conversation was replayed to the stateless upstream
        messages = mock.stats()["last_bodies"][-1]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
        assert messages[1]["tool_calls"][0]["id"] == item.call_id


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_responses_two_turn_conversation_retrieve_and_delete(agents_proxy, mock, model):
    client = oai(agents_proxy)
    first = client.responses.create(model=model, input="Name a colour.", instructions="You are a guide.")
    second = client.responses.create(model=model, input="Another one?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text
    sent = mock.stats()["last_bodies"][-1]
    if model == "chat-big":
        # Turn one (without its instructions: they do not carry over) came back as history.
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
        assert sent["messages"][1]["content"] == first.output_text
    else:
        assert sent["previous_response_id"] == first.id  # the upstream keeps its own
    assert client.responses.retrieve(first.id).output_text == first.output_text
    # Another team cannot read it.
    with pytest.raises(openai.NotFoundError):
        oai(agents_proxy, "beta").responses.retrieve(first.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_responses_unknown_previous_id_to_a_chat_upstream_is_a_404(agents_proxy, mock):
    before = spend(agents_proxy)
    with pytest.raises(openai.NotFoundError) as e:
        oai(agents_proxy).responses.create(model="chat-big", input="Hi", previous_response_id="resp_unknown")
    assert e.value.body["param"] == "previous_response_id"
    assert mock.calls("/v1/chat/completions") == 0 and spend(agents_proxy) == before


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_responses_input_tokens(agents_proxy, mock, model):
    body = {"model": model, "input": "How many tokens is this?"}
    r = httpx.post(agents_proxy.url + "/v1/responses/input_tokens", json=body, headers=_bearer())
    assert r.status_code == 200 and r.json()["object"] == "response.input_tokens" and r.json()["input_tokens"] > 0
    assert mock.calls("/v1/responses/input_tokens") == (1 if model == "gpt-resp" else 0)


# -------------------------------------------------------------------------------------------- Messages


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_messages_create_through_the_proxy(agents_proxy, mock, model):
    raw = claude(agents_proxy).messages.with_raw_response.create(
        model=model, max_tokens=100, system="You are a guide.", messages=[{"role": "user", "content": "Hi"}]
    )
    m = raw.parse()
    Message.model_validate(m.model_dump())
    assert m.stop_reason == "end_turn" and m.content[0].type == "text" and len(m.content[0].text.split()) == 32
    assert raw.headers["x-llm-proxy-model"] == model
    if model == "claude":
        seen = httpx.get(mock.url + "/mock/agent").json()["seen"][-1]
        # The policy's key goes upstream, never the client's; the client's anthropic-version does.
        assert seen["x-api-key"] == "upstream-anthropic-key" and seen["authorization"] is None
        assert seen["anthropic-version"] == raw.http_request.headers["anthropic-version"]
        assert mock.stats()["last_bodies"][-1]["model"] == "claude-sonnet-4-5"
    else:
        sent = mock.stats()["last_bodies"][-1]
        assert sent["messages"][0] == {"role": "system", "content": "You are a guide."} and sent["max_tokens"] == 100


def test_messages_native_keeps_cache_control_and_thinking_blocks(agents_proxy, mock):
    system = [{"type": "text", "text": "A long shared prefix.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    history = [
        {"role": "user", "content": "Think first."},
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "ok"}],
        },
        {"role": "user", "content": "And now?"},
    ]
    claude(agents_proxy, default_headers={"anthropic-beta": "extended-cache-ttl-2025-04-11"}).messages.create(
        model="claude", max_tokens=50, system=system, messages=history
    )
    sent = mock.stats()["last_bodies"][-1]
    assert sent["system"] == system and sent["messages"] == history


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_messages_stream(agents_proxy, mock, model):
    before = spend(agents_proxy)
    with claude(agents_proxy).messages.stream(
        model=model, max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text and len(text.split()) == 32
    assert final.usage.output_tokens == 32 and final.usage.input_tokens > 0
    input_tokens = final.usage.input_tokens
    cost = _per_mtok(input_tokens, PRICES[model]["input"]) + _per_mtok(32, PRICES[model]["output"])
    assert spend(agents_proxy) - before == pytest.approx(cost, abs=1e-9)


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_messages_tool_use_round_trip(agents_proxy, mock, model):
    client = claude(agents_proxy)
    use = client.messages.create(
        model=model, max_tokens=100, tools=[CLAUDE_WEATHER], messages=[{"role": "user", "content": "Paris?"}]
    )
    assert use.stop_reason == "tool_use"
    block = next(b for b in use.content if b.type == "tool_use")
    assert block.name == "get_weather" and block.input == {"city": "Paris"}
    done = client.messages.create(
        model=model,
        max_tokens=100,
        tools=[CLAUDE_WEATHER],
        messages=[
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in use.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "18C"}]},
        ],
    )
    assert done.stop_reason == "end_turn" and done.content[0].text


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_messages_count_tokens(agents_proxy, mock, model):
    before = spend(agents_proxy)
    count = claude(agents_proxy).messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "How many tokens is this?"}], tools=[CLAUDE_WEATHER]
    )
    assert count.input_tokens > 0
    assert mock.calls("/v1/messages/count_tokens") == (1 if model == "claude" else 0)
    assert mock.calls("/v1/messages") == 0 and spend(agents_proxy) == before  # counting is free


def test_messages_key_as_a_bearer_token(agents_proxy, mock):
    client = anthropic.Anthropic(base_url=agents_proxy.url, auth_token=KEYS["alpha"], max_retries=0)
    m = client.messages.create(model="claude", max_tokens=20, messages=[{"role": "user", "content": "Hi"}])
    assert m.content[0].text


# ------------------------------------------------------------------------------- budgets and policies


def test_a_budget_refuses_each_api_in_its_own_shape_and_spends_nothing(agents_proxy, mock):
    with pytest.raises(openai.RateLimitError) as e:
        oai(agents_proxy, "poor").responses.create(model="chat-big", input="Hi", max_output_tokens=1000)
    assert e.value.body["code"] == "budget_exceeded"
    with pytest.raises(anthropic.RateLimitError) as e:
        claude(agents_proxy, "poor").messages.create(
            model="claude", max_tokens=1000, messages=[{"role": "user", "content": "Hi"}]
        )
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "rate_limit_error"
    assert "budget" in e.value.body["error"]["message"]
    assert mock.stats()["calls"] == {} and spend(agents_proxy, "poor") == 0


@pytest.mark.parametrize(("api", "model"), [("responses", "gpt-resp"), ("messages", "claude")])
def test_route_rewrites_the_model_for_each_api(agents_proxy, mock, api, model):
    headers = {"x-test-route": "1"}
    if api == "responses":
        raw = oai(agents_proxy, default_headers=headers).responses.with_raw_response.create(model=model, input="Hi")
        assert raw.parse().output_text
    else:
        raw = claude(agents_proxy, default_headers=headers).messages.with_raw_response.create(
            model=model, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        )
        assert raw.parse().content[0].text
    # Routed from a native model to a chat-only one: translated on the way, answered in the client's format.
    assert raw.headers["x-llm-proxy-model"] == "chat-small" and "to-small" in raw.headers["x-llm-proxy-policies"]
    assert mock.stats()["last_bodies"][-1]["model"] == "mock-small"
    assert float(raw.headers["x-llm-proxy-saved-usd"]) > 0


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_concise_injects_into_instructions(agents_proxy, mock, model):
    client = oai(agents_proxy, default_headers={"x-test-concise": "1"})
    raw = client.responses.with_raw_response.create(model=model, input="Explain DNS.", instructions="You are kind.")
    assert "be-concise" in raw.headers["x-llm-proxy-policies"]
    sent = mock.stats()["last_bodies"][-1]
    if model == "gpt-resp":
        assert sent["instructions"] == "You are kind.\n\nAnswer in one sentence."
    else:
        assert sent["messages"][0] == {"role": "system", "content": "You are kind.\n\nAnswer in one sentence."}


@pytest.mark.parametrize("model", MESSAGES_MODELS)
def test_concise_injects_into_the_system_prompt(agents_proxy, mock, model):
    cached = {"type": "text", "text": "Shared prefix.", "cache_control": {"type": "ephemeral"}}
    client = claude(agents_proxy, default_headers={"x-test-concise": "1"})
    raw = client.messages.with_raw_response.create(
        model=model, max_tokens=50, system=[cached], messages=[{"role": "user", "content": "Explain DNS."}]
    )
    assert "be-concise" in raw.headers["x-llm-proxy-policies"]
    sent = mock.stats()["last_bodies"][-1]
    if model == "claude":  # after the cached block, which stays as it was
        assert sent["system"] == [cached, {"type": "text", "text": "Answer in one sentence."}]
    else:
        assert sent["messages"][0] == {"role": "system", "content": "Shared prefix.\nAnswer in one sentence."}


# ---------------------------------------------------------------------------------------- exact cost


def _metric(server: Server, model: str, kind: str) -> float:
    """Tokens of `kind` billed to team alpha on `model`, reported and counted together."""
    text = httpx.get(server.url + "/metrics").text
    labels = (f'model="{model}"', 'team="alpha"', f'type="{kind}"')
    return sum(
        float(row.split()[-1])
        for row in text.splitlines()
        if row.startswith("llm_proxy_tokens_total{") and all(label in row for label in labels)
    )


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_responses_spend_is_exact_with_cached_and_reasoning_tokens(agents_proxy, mock, model):
    mock.configure(cached_input_tokens=12, reasoning_tokens=7)
    before, cached_before = spend(agents_proxy), _metric(agents_proxy, model, "cached_input")
    reasoning_before = _metric(agents_proxy, model, "reasoning")
    raw = oai(agents_proxy).responses.with_raw_response.create(
        model=model, input="A question long enough to have a cached prefix of many tokens, surely."
    )
    usage = raw.parse().usage
    assert usage.input_tokens_details.cached_tokens == 12 and usage.output_tokens_details.reasoning_tokens == 7
    p = PRICES[model]
    reasoning_price = p.get("reasoning", p["output"])
    cost = (
        _per_mtok(usage.input_tokens - 12, p["input"])
        + _per_mtok(12, p["cached"])
        + _per_mtok(usage.output_tokens - 7, p["output"])
        + _per_mtok(7, reasoning_price)
    )
    assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(cost, abs=1e-9)
    assert spend(agents_proxy) - before == pytest.approx(cost, abs=1e-9)
    assert _metric(agents_proxy, model, "cached_input") - cached_before == 12
    assert _metric(agents_proxy, model, "reasoning") - reasoning_before == 7


@pytest.mark.parametrize("stream", [False, True])
def test_messages_spend_is_exact_with_cache_reads_and_both_cache_writes(agents_proxy, mock, stream):
    mock.configure(cached_input_tokens=10, cache_write_tokens=6, cache_write_1h_tokens=2)
    before = spend(agents_proxy)
    kwargs = {
        "model": "claude",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "A long cached prompt, " * 8}],
    }
    if stream:
        with claude(agents_proxy).messages.stream(**kwargs) as s:
            usage = s.get_final_message().usage
    else:
        usage = claude(agents_proxy).messages.create(**kwargs).usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (10, 6)
    p = PRICES["claude"]
    cost = (
        _per_mtok(usage.input_tokens, p["input"])
        + _per_mtok(10, p["cached"])
        + _per_mtok(4, p["write"])
        + _per_mtok(2, p["write_1h"])
        + _per_mtok(usage.output_tokens, p["output"])
    )
    assert spend(agents_proxy) - before == pytest.approx(cost, abs=1e-9)


def test_messages_translated_spend_keeps_reasoning_tokens(agents_proxy, mock):
    mock.configure(cached_input_tokens=5, reasoning_tokens=9)
    before = spend(agents_proxy)
    m = claude(agents_proxy).messages.create(
        model="chat-big", max_tokens=100, messages=[{"role": "user", "content": "Think about a long question."}]
    )
    # Anthropic's usage shape has no reasoning field: the output includes them, priced at their own rate.
    p = PRICES["chat-big"]
    cost = (
        _per_mtok(m.usage.input_tokens, p["input"])
        + _per_mtok(5, p["cached"])
        + _per_mtok(m.usage.output_tokens - 9, p["output"])
        + _per_mtok(9, p["reasoning"])
    )
    assert m.usage.cache_read_input_tokens == 5
    assert spend(agents_proxy) - before == pytest.approx(cost, abs=1e-9)


# ----------------------------------------------------------------------------------------- bad input


def _bearer(team: str = "alpha") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[team]}"}


def _assert_anthropic_error(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/responses", {"model": "chat-big"}, 400, "input"),
        ("/v1/responses", {"model": "chat-big", "input": 5}, 400, "input"),
        ("/v1/responses", {"model": "chat-big", "input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ("/v1/responses", {"model": "nope", "input": "x"}, 404, "model"),
        # Built-in tools need an upstream that serves the Responses API.
        ("/v1/responses", {"model": "chat-big", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0]"),
        ("/v1/responses/input_tokens", {"model": "chat-big"}, 400, "input"),
    ],
)
def test_bad_responses_input_gets_an_openai_error_and_spends_nothing(agents_proxy, mock, path, body, status, param):
    before = spend(agents_proxy)
    r = httpx.post(agents_proxy.url + path, json=body, headers=_bearer())
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert mock.stats()["calls"] == {} and spend(agents_proxy) == before


def _msg(**fields) -> dict:
    return {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **fields}


INVALID = "invalid_request_error"
WEB_SEARCH = [{"type": "web_search_20250305", "name": "web_search"}]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "kind"),
    [
        ("/v1/messages", {"model": "claude", "messages": [{"role": "user", "content": "x"}]}, None, 400, INVALID),
        ("/v1/messages", _msg(messages=[]), None, 400, INVALID),
        ("/v1/messages", _msg(messages="hi"), None, 400, INVALID),
        ("/v1/messages", _msg(model="nope"), None, 404, "not_found_error"),
        ("/v1/messages", _msg(), {"x-api-key": "wrong"}, 401, "authentication_error"),
        ("/v1/messages", _msg(), {"anthropic-version": "latest"}, 400, INVALID),
        ("/v1/messages", _msg(), {"x-api-key": KEYS["beta"]}, 403, "permission_error"),  # not beta's model
        # A server tool only Anthropic runs cannot go to a chat upstream.
        ("/v1/messages", _msg(model="chat-big", tools=WEB_SEARCH), None, 400, INVALID),
        ("/v1/messages/count_tokens", {"model": "claude", "messages": []}, None, 400, INVALID),
        ("/v1/messages/count_tokens", _msg(), {"x-api-key": "wrong"}, 401, "authentication_error"),
    ],
)
def test_bad_messages_input_gets_an_anthropic_error_and_spends_nothing(
    agents_proxy, mock, path, body, headers, status, kind
):
    before = spend(agents_proxy)
    sent = {"x-api-key": KEYS["alpha"], "anthropic-version": "2023-06-01", **(headers or {})}
    r = httpx.post(agents_proxy.url + path, json=body, headers=sent)
    _assert_anthropic_error(r, status, kind)
    assert mock.stats()["calls"] == {} and spend(agents_proxy) == before


def test_messages_bad_json_and_wrong_method_in_anthropic_shape(agents_proxy, mock):
    r = httpx.post(
        agents_proxy.url + "/v1/messages",
        content=b"{not json",
        headers={"x-api-key": KEYS["alpha"], "content-type": "application/json"},
    )
    _assert_anthropic_error(r, 400, "invalid_request_error")
    _assert_anthropic_error(
        httpx.get(agents_proxy.url + "/v1/messages", headers={"x-api-key": KEYS["alpha"]}), 405, "invalid_request_error"
    )


def test_an_upstream_error_on_messages_comes_back_in_anthropic_shape(agents_proxy, mock):
    mock.fault(status=400, count=1)
    r = httpx.post(
        agents_proxy.url + "/v1/messages",
        json={"model": "chat-big", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        headers={"x-api-key": KEYS["alpha"]},
    )
    _assert_anthropic_error(r, 400, "invalid_request_error")


# -------------------------------------------------------------------------------------- models and 404


def test_get_a_model_by_id(agents_proxy):
    client = oai(agents_proxy)
    assert client.models.retrieve("claude").owned_by == "anthropic"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        oai(agents_proxy, "poor").models.retrieve("nope")


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/chat/completion", "/nowhere"])
def test_an_unknown_path_names_it_and_the_endpoints_that_exist(agents_proxy, path):
    r = httpx.post(agents_proxy.url + path, json={}, headers=_bearer())
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert path in message and "POST /v1/responses" in message and "POST /v1/messages" in message
