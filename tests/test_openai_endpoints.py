"""The OpenAI endpoints through the real proxy, driven by the official openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import TEAM_KEYS, client_for, policy_yaml, start_proxy, team_spend, wait_for


def test_chat_completion_is_relayed_with_usage_cost_and_proxy_headers(proxy, mock):
    client = client_for(proxy)
    raw = client.chat.completions.with_raw_response.create(
        model="big", messages=[{"role": "user", "content": "What is a proxy?"}]
    )
    reply = raw.parse()
    assert reply.choices[0].message.content
    assert reply.model == "mock-big"  # the response says which upstream model answered
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == 32
    expected = usage.prompt_tokens * 2.5e-6 + usage.completion_tokens * 10e-6
    assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(expected, abs=1e-9)
    assert raw.headers["x-llm-proxy-model"] == "big"
    assert raw.headers["x-llm-proxy-route"] == "upstream"
    assert len(raw.headers["x-llm-proxy-request-id"]) == 24
    assert float(raw.headers["x-llm-proxy-overhead-ms"]) >= 0
    sent = mock.stats()["last_bodies"][-1]
    assert sent["model"] == "mock-big"  # rewritten to upstream_model
    assert sent["messages"] == [{"role": "user", "content": "What is a proxy?"}]


def test_unknown_request_fields_pass_through_untouched(proxy, mock):
    client_for(proxy).chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.3,
        extra_body={"vendor_flag": {"x": [1, 2]}, "seed": 7},
    )
    sent = mock.stats()["last_bodies"][-1]
    assert sent["vendor_flag"] == {"x": [1, 2]} and sent["seed"] == 7 and sent["temperature"] == 0.3


def test_stream_with_include_usage_relays_usage_chunk(proxy, mock):
    client = client_for(proxy)
    chunks = list(
        client.chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 32
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.completion_tokens == 32


def test_stream_without_include_usage_hides_usage_but_still_accounts_it(proxy, mock):
    before = team_spend(proxy, "alpha")["by_model"].get("small", {}).get("output_tokens", 0)
    chunks = list(
        client_for(proxy).chat.completions.create(
            model="small", messages=[{"role": "user", "content": "stream please"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert mock.stats()["last_bodies"][-1]["stream_options"] == {"include_usage": True}
    after = team_spend(proxy, "alpha")["by_model"]["small"]["output_tokens"]
    assert after - before == 32


def test_stream_from_upstream_without_usage_counts_completion_tokens(proxy, mock):
    mock.configure(usage=False)
    before = team_spend(proxy, "alpha")["by_model"].get("nousage", {}).get("output_tokens", 0)
    chunks = list(
        client_for(proxy).chat.completions.create(
            model="nousage", messages=[{"role": "user", "content": "count me"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "stream_options" not in mock.stats()["last_bodies"][-1]
    from proxy.services.tokens import counter_for

    after = team_spend(proxy, "alpha")["by_model"]["nousage"]["output_tokens"]
    assert after - before == counter_for("mock-nousage").text(text)


def test_non_stream_reply_without_usage_is_counted(proxy, mock):
    mock.configure(usage=False)
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "no usage here"}]
    )
    reply = raw.parse()
    assert reply.usage is None
    assert float(raw.headers["x-llm-proxy-cost-usd"]) > 0


def test_completions_endpoint(proxy, mock):
    reply = client_for(proxy).completions.create(model="small", prompt=["one", "two"], max_tokens=5)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(len(c.text.split()) == 5 for c in reply.choices)
    assert reply.usage.completion_tokens > 0


def test_embeddings_endpoint(proxy, mock):
    reply = client_for(proxy).embeddings.create(model="embed", input=["alpha", "beta", "gamma"])
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert len(reply.data[0].embedding) == 16
    assert reply.usage.prompt_tokens == 3


def test_models_lists_only_the_teams_models(proxy):
    assert {m.id for m in client_for(proxy, "beta").models.list()} == {"small", "embed"}
    assert {"big", "small", "flaky", "embed", "claude"} <= {m.id for m in client_for(proxy, "alpha").models.list()}


def test_api_key_header_is_accepted(proxy, mock):
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        headers={"api-key": TEAM_KEYS["beta"]},
        json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200, r.text


def test_health_and_readiness(proxy):
    assert httpx.get(proxy.url + "/healthz").json() == {"status": "ok"}
    ready = wait_for(lambda: (r := httpx.get(proxy.url + "/readyz")).status_code == 200 and r, "readiness", 60)
    assert ready.json()["store"] == {"backend": "memory", "healthy": True}


def test_tokenizers_are_loaded_before_the_proxy_is_ready_not_on_the_first_request(tmp_path, mock):
    server = start_proxy(tmp_path, policy_yaml(mock.url))
    try:
        ready = wait_for(lambda: (r := httpx.get(server.url + "/readyz")).status_code == 200 and r, "readiness", 60)
        # every test model counts with o200k_base: loaded before any request was sent
        assert ready.json()["tokenizers"] == {"ready": True, "loaded": ["o200k_base"]}
    finally:
        server.stop()


def test_litellm_adapter_serves_a_non_openai_provider(proxy, mock):
    """provider: anthropic goes through litellm, which speaks Anthropic's Messages API to the mock."""
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": "Hello Claude"}], max_tokens=10
    )
    reply = raw.parse()
    assert reply.choices[0].message.content.split()[:1]
    assert reply.usage.completion_tokens == 10
    assert mock.calls("/v1/messages") == 1
    assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(
        reply.usage.prompt_tokens * 0.8e-6 + 10 * 4e-6, abs=1e-9
    )


def test_sdk_raises_typed_errors(proxy):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client_for(proxy).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
