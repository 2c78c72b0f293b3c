"""Retries (connect errors, timeouts, 429, 5xx), Retry-After, fallbacks, and never retrying a started stream."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import client_for, team_spend


def _metric(proxy, name: str, **labels) -> float:
    """Sum of the series of `name` that carry all of `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in httpx.get(proxy.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if all(w in series for w in wanted):
                total += float(value)
    return total


def test_5xx_is_retried_until_success(proxy, mock):
    retries = _metric(proxy, "llm_proxy_retries_total", model="big")
    mock.fault(status=503, count=2, model="mock-big")
    reply = client_for(proxy).chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content
    assert mock.calls() == 3
    assert _metric(proxy, "llm_proxy_retries_total", model="big") - retries == 2


def test_429_with_retry_after_is_honoured_then_succeeds(proxy, mock):
    mock.fault(status=429, retry_after="1", count=1, model="mock-big")
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="big", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.status_code == 200 and mock.calls() == 2
    # The proxy waited at least the upstream's Retry-After before the second attempt.
    assert raw.elapsed.total_seconds() >= 1.0


def test_connection_reset_is_retried(proxy, mock):
    mock.fault(reset=True, count=1, model="mock-big")
    reply = client_for(proxy).chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
    assert reply.choices and mock.calls() == 2


def test_exhausted_retries_return_the_upstreams_error(proxy, mock):
    mock.fault(status=500, count=10, model="mock-big")
    with pytest.raises(openai.InternalServerError) as e:
        client_for(proxy).chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 500
    assert mock.calls() == 3  # max_attempts


def test_long_retry_after_is_not_waited_for(proxy, mock):
    mock.fault(status=429, retry_after="3600", count=10, model="mock-big")
    with pytest.raises(openai.RateLimitError) as e:
        client_for(proxy).chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
    assert mock.calls() == 1
    assert e.value.response.headers["retry-after"] == "3600"


def test_fallback_answers_when_the_primary_keeps_failing(proxy, mock):
    fallbacks = _metric(proxy, "llm_proxy_fallbacks_total", model="flaky", fallback="small")
    mock.fault(status=502, count=10, model="mock-flaky")
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": "x"}]
    )
    reply = raw.parse()
    assert raw.headers["x-llm-proxy-model"] == "small"
    assert reply.model == "mock-small"
    assert [b["model"] for b in mock.stats()["last_bodies"]] == ["mock-flaky"] * 3 + ["mock-small"]
    assert _metric(proxy, "llm_proxy_fallbacks_total", model="flaky", fallback="small") - fallbacks == 1
    # Priced at the model that answered.
    u = reply.usage
    assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(
        u.prompt_tokens * 0.15e-6 + u.completion_tokens * 0.6e-6, abs=1e-9
    )


def test_timeout_then_fallback(proxy, mock):
    mock.fault(stall_s=2.5, count=3, model="mock-flaky")  # flaky has timeout_s: 1
    raw = client_for(proxy).chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-llm-proxy-model"] == "small"


def test_stream_is_retried_before_it_starts(proxy, mock):
    mock.fault(status=503, count=1, model="mock-big")
    chunks = list(
        client_for(proxy).chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert chunks and mock.calls() == 2


def test_stream_is_never_retried_after_the_first_byte(proxy, mock):
    spent = team_spend(proxy, "alpha")["by_model"].get("big", {}).get("output_tokens", 0)
    mock.fault(after_chunks=3, count=1, model="mock-big")
    received = []
    with pytest.raises(openai.APIError):
        for chunk in client_for(proxy).chat.completions.create(
            model="big", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            received.append(chunk)
    assert len(received) == 3
    assert mock.calls() == 1
    # The three relayed chunks are accounted (3 one-word deltas).
    assert team_spend(proxy, "alpha")["by_model"]["big"]["output_tokens"] - spent == 3
