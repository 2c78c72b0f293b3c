"""A client that disconnects mid-stream: the upstream request is cancelled, streamed tokens are accounted."""

from __future__ import annotations

import time

import httpx

from tests.conftest import TEAM_KEYS, team_spend, wait_for


def test_client_disconnect_cancels_upstream_and_accounts_streamed_tokens(proxy, mock):
    mock.configure(chunk_delay_ms=50, reply_tokens=200)
    before = team_spend(proxy, "alpha")["by_model"].get("small", {}).get("output_tokens", 0)
    received = 0
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
        json={"model": "small", "messages": [{"role": "user", "content": "long please"}], "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                received += 1
            if received == 5:
                break
    wait_for(lambda: mock.stats()["calls"].get("stream_cancelled", 0) >= 1, "the upstream to see the cancel", 10)
    spent = wait_for(
        lambda: team_spend(proxy, "alpha")["by_model"].get("small", {}).get("output_tokens", 0) - before,
        "the streamed tokens to be recorded",
        10,
    )
    assert 5 <= spent < 200
    # The proxy keeps serving.
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
        json={"model": "small", "messages": [{"role": "user", "content": "still there?"}]},
    )
    assert r.status_code == 200


def test_a_non_stream_client_that_gives_up_cancels_its_upstream_call(session_tmp, mock):
    """The reservation is released when the client leaves, long before the upstream would answer."""
    from tests.conftest import admin_spend, policy_yaml, start_proxy

    policy = policy_yaml(mock.url).replace(
        '    models: ["*"]\n', '    models: ["*"]\n    budget: {usd: 10, period: day}\n', 1
    )
    proxy = start_proxy(session_tmp, policy)
    try:
        mock.configure(latency_ms=8000)
        try:
            httpx.post(
                proxy.url + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
                json={"model": "big", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 100},
                timeout=httpx.Timeout(10, read=1.0),
            )
            raise AssertionError("the mock should not have answered within the client's timeout")
        except httpx.ReadTimeout:
            pass
        started = time.monotonic()
        budget = wait_for(
            lambda: (b := admin_spend(proxy)["teams"]["alpha"]["budget"])["reserved_usd"] == 0 and b, timeout=5
        )
        assert time.monotonic() - started < 5  # well before the upstream's 8 s
        assert budget["spent_usd"] == 0
        metrics = httpx.get(proxy.url + "/metrics").text
        assert 'llm_proxy_requests_total{model="big",route="upstream",status_class="4xx",team="alpha"}' in metrics
    finally:
        proxy.stop()
