"""Stream usage when the upstream sends none (llama.cpp's server ignores `stream_options`): a client that
asked for `include_usage` still gets a usage chunk before `[DONE]`, counted by the proxy, and counted
usage is marked as such in the request log and in `llm_proxy_tokens_total{source}`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from proxy.services.tokens import counter_for
from tests.conftest import TEAM_KEYS, MockUpstream, Server, client_for, policy_yaml, start_proxy, team_spend, wait_for

AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}
BODY = {
    "model": "small",
    "messages": [{"role": "user", "content": "Tell me about tokens."}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, mock_upstream: MockUpstream) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("streamusage")
    server = start_proxy(tmp, policy_yaml(mock_upstream.url, f"log:\n  requests: {tmp / 'requests.jsonl'}\n"))
    server.requests_log = tmp / "requests.jsonl"
    yield server
    server.stop()


@pytest.fixture
def silent_mock(mock: MockUpstream) -> MockUpstream:
    mock.configure(usage=False)  # as llama.cpp: no usage chunk whatever stream_options says
    return mock


def _events(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]


def _tokens_metric(server: Server, source: str, kind: str) -> float:
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        wanted = (f'source="{source}"', f'type="{kind}"', 'model="small"', 'team="alpha"')
        if line.startswith("llm_proxy_tokens_total{") and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_client_that_asked_for_usage_gets_a_counted_usage_chunk_before_done(logged, silent_mock):
    before = team_spend(logged, "alpha")["by_model"].get("small", {"input_tokens": 0, "output_tokens": 0})
    with httpx.stream("POST", logged.url + "/v1/chat/completions", json=BODY, headers=AUTH) as r:
        r.read()
    assert r.status_code == 200
    events = _events(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    assert last["id"] == chunks[0]["id"] and last["model"] == chunks[0]["model"]
    assert [c for c in chunks if c.get("usage")] == [last]  # exactly one usage chunk, the last
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    usage = last["usage"]
    assert usage["completion_tokens"] == counter_for("mock-small").text(text) > 0
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # What the client is told is what was billed.
    after = wait_for(
        lambda: (
            (m := team_spend(logged, "alpha")["by_model"].get("small"))
            and m["output_tokens"] > before["output_tokens"]
            and m
        )
    )
    assert after["input_tokens"] - before["input_tokens"] == usage["prompt_tokens"]
    assert after["output_tokens"] - before["output_tokens"] == usage["completion_tokens"]
    assert silent_mock.calls() == 1


def test_the_openai_sdk_reads_the_counted_usage_chunk(logged, silent_mock):
    stream = client_for(logged).chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "Say something."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_counted_usage_is_marked_in_the_request_log_and_the_token_metric(logged, silent_mock):
    counted_before = _tokens_metric(logged, "counted", "output")
    with httpx.stream("POST", logged.url + "/v1/chat/completions", json=BODY, headers=AUTH) as r:
        r.read()
    request_id = r.headers["x-llm-proxy-request-id"]

    def logged_line():
        if not logged.requests_log.exists():
            return None
        for line in logged.requests_log.read_text().splitlines():
            record = json.loads(line)
            if record["request_id"] == request_id:
                return record
        return None

    record = wait_for(logged_line, "the request's log line")
    assert record["usage"]["counted"] is True and record["usage"]["completion_tokens"] > 0
    assert wait_for(lambda: _tokens_metric(logged, "counted", "output") > counted_before, "the counted metric")

    # The upstream's own usage is relayed as is and marked as reported.
    silent_mock.configure(usage=True)
    reported_before = _tokens_metric(logged, "reported", "output")
    with httpx.stream("POST", logged.url + "/v1/chat/completions", json=BODY, headers=AUTH) as r:
        r.read()
    request_id = r.headers["x-llm-proxy-request-id"]
    chunks = [json.loads(e) for e in _events(r) if e != "[DONE]"]
    assert len([c for c in chunks if c.get("usage")]) == 1
    record = wait_for(logged_line, "the request's log line")
    assert record["usage"]["counted"] is False
    assert wait_for(lambda: _tokens_metric(logged, "reported", "output") > reported_before, "the reported metric")


def test_a_client_that_did_not_ask_for_usage_gets_no_usage_chunk(logged, silent_mock):
    body = {**BODY, "stream_options": None}
    with httpx.stream("POST", logged.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        r.read()
    events = _events(r)
    assert events[-1] == "[DONE]"
    assert not any(json.loads(e).get("usage") for e in events[:-1])
