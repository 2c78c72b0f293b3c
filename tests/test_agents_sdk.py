"""The OpenAI Agents SDK with its default model (the Responses API) through the real proxy, to a Responses
upstream (forwarded natively) and to a Chat Completions upstream (translated): a plain run, a streamed run,
and a tool-call turn. The SDK's own tracing (exported to api.openai.com by default) is off and checked off."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_provider import OpenAIProvider
from agents.models.openai_responses import OpenAIResponsesModel
from agents.tracing import TracingProcessor, add_trace_processor, flush_traces, set_trace_processors
from agents.tracing.processors import BackendSpanExporter

from tests.conftest import MockUpstream, Server, start_proxy
from tests.test_agent_apis import KEYS, RESPONSES_MODELS, _policy, upstream_path


class _Recorder(TracingProcessor):
    """Every trace and span the SDK would hand to an exporter."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def on_trace_start(self, trace) -> None:
        self.seen.append(trace)

    def on_trace_end(self, trace) -> None:
        self.seen.append(trace)

    def on_span_start(self, span) -> None:
        self.seen.append(span)

    def on_span_end(self, span) -> None:
        self.seen.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def sdk_proxy(session_tmp: Path, mock_upstream: MockUpstream) -> Iterator[Server]:
    server = start_proxy(session_tmp, _policy(mock_upstream.url))
    yield server
    server.stop()


@pytest.fixture
def no_export(monkeypatch) -> Iterator[tuple[_Recorder, list[object]]]:
    """Records what would be traced and what the OpenAI backend exporter would send (nothing, with tracing off)."""
    exported: list[object] = []
    monkeypatch.setattr(BackendSpanExporter, "export", lambda self, items: exported.extend(items))
    recorder = _Recorder()
    add_trace_processor(recorder)
    yield recorder, exported
    set_trace_processors([])


@function_tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"18C and sunny in {city}"


def _run_config(server: Server) -> RunConfig:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEYS["alpha"], max_retries=0)
    # The SDK's default provider and API (Responses); only the client points at the proxy.
    return RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)


def _assert_nothing_traced_or_exported(no_export) -> None:
    recorder, exported = no_export
    flush_traces()
    assert recorder.seen == [] and exported == []


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_agents_sdk_run_with_its_default_responses_model(sdk_proxy, mock, model, no_export):
    config = _run_config(sdk_proxy)
    assert isinstance(config.model_provider.get_model(model), OpenAIResponsesModel)
    agent = Agent(name="guide", instructions="You are a guide.", model=model)
    result = asyncio.run(Runner.run(agent, "What is a proxy?", run_config=config))
    assert len(result.final_output.split()) == 32
    assert result.context_wrapper.usage.output_tokens == 32 and result.context_wrapper.usage.requests == 1
    assert mock.calls(upstream_path(mock, model)) == 1
    _assert_nothing_traced_or_exported(no_export)


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_agents_sdk_tool_call_turn(sdk_proxy, mock, model, no_export):
    agent = Agent(name="weather", instructions="Use the tool.", model=model, tools=[get_weather])
    result = asyncio.run(Runner.run(agent, "Weather in Paris?", run_config=_run_config(sdk_proxy)))
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert result.new_items[0].raw_item.name == "get_weather"
    assert result.new_items[1].output == "18C and sunny in Paris"
    assert result.final_output and result.context_wrapper.usage.requests == 2
    assert mock.calls(upstream_path(mock, model)) == 2
    sent = mock.stats()["last_bodies"][-1]
    if model == "gpt-resp":  # the SDK's items went as they came
        assert [i.get("type") for i in sent["input"]][-2:] == ["function_call", "function_call_output"]
    else:  # translated: the call and its result became chat messages
        assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
        assert sent["messages"][-1]["content"] == "18C and sunny in Paris"
    _assert_nothing_traced_or_exported(no_export)


@pytest.mark.parametrize("model", RESPONSES_MODELS)
def test_agents_sdk_streamed_run(sdk_proxy, mock, model, no_export):
    agent = Agent(name="guide", instructions="You are a guide.", model=model)

    async def run() -> tuple[list[str], str]:
        streamed = Runner.run_streamed(agent, "Stream please.", run_config=_run_config(sdk_proxy))
        kinds = [e.data.type async for e in streamed.stream_events() if e.type == "raw_response_event"]
        return kinds, streamed.final_output

    kinds, final = asyncio.run(run())
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 32 and len(final.split()) == 32
    assert mock.calls(upstream_path(mock, model)) == 1
    _assert_nothing_traced_or_exported(no_export)
