"""Budgets that never overspend and rate limits that hold, across replicas sharing one Redis
(and a Redis Cluster); the store failure policy when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import httpx
import pytest
import redis

from tests.conftest import REDIS_URL, admin_spend, delete_redis_keys, policy_yaml, start_proxy
from tests.redis_servers import OwnCluster, OwnRedis

BODY = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
# The worst case a request reserves: prompt tokens × input price + max_tokens × output price.
PROMPT_TOKENS = 8
WORST_CASE_USD = PROMPT_TOKENS * 0.15e-6 + 32 * 0.6e-6


def _team(name: str, key: str, body: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"  {name}:\n    keys: [sha256:{digest}]\n    models: [small, big]\n" + "".join(
        f"    {line}\n" for line in body.splitlines()
    )


def _policy(mock_url: str, prefix: str, teams: str, on_failure: str = "fail_open") -> str:
    base = policy_yaml(mock_url)
    return (
        base.replace("teams:\n", "teams:\n" + teams, 1)
        + f"store:\n  key_prefix: {prefix}\n  on_failure: {on_failure}\n"
    )


async def _burst(urls: list[str], key: str, n: int, body: dict | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    urls[i % len(urls)] + "/v1/chat/completions",
                    json=body or BODY,
                    headers={"Authorization": f"Bearer {key}"},
                )
                for i in range(n)
            )
        )


def _cleanup(prefix: str, url: str = REDIS_URL) -> None:
    delete_redis_keys(f"{prefix}:", url)


@pytest.fixture
def prefix():
    p = f"llmpbudget{uuid.uuid4().hex[:8]}"
    yield p
    _cleanup(p)


@pytest.fixture
def slow_mock(mock):
    mock.configure(latency_ms=150, reply_tokens=10)
    return mock


def _budget_hash(client: redis.Redis, prefix: str, team: str) -> dict[str, int]:
    keys = list(client.scan_iter(f"{prefix}:{{t:{team}}}:budget:team:*"))
    assert len(keys) == 1, keys
    return {k.decode(): int(v) for k, v in client.hgetall(keys[0]).items()}


def _check_burst(responses, spend_usd: float, budget_usd: float, budget: dict[str, int]) -> int:
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded" for r in refused), {
        r.status_code for r in refused
    }
    assert refused, "the burst should have hit the budget"
    header_total = sum(float(r.headers["x-llm-proxy-cost-usd"]) for r in ok)
    assert spend_usd <= budget_usd
    assert spend_usd == pytest.approx(header_total, abs=1e-9)
    assert budget.get("reserved", 0) == 0  # every accepted request was settled
    assert budget["spent"] / 1e9 == pytest.approx(header_total, abs=1e-8)
    return len(ok)


async def test_three_replicas_never_jointly_overspend_a_budget(session_tmp, slow_mock, prefix):
    budget_usd = round(100 * WORST_CASE_USD, 9)
    policy = _policy(slow_mock.url, prefix, _team("burst", "sk-burst", f"budget: {{usd: {budget_usd}, period: day}}"))
    proxies = [start_proxy(session_tmp, policy, redis_url=REDIS_URL) for _ in range(3)]
    try:
        responses = await _burst([p.url for p in proxies], "sk-burst", 300)
        deadline = time.monotonic() + 10
        while True:  # spend is recorded after each response is sent
            spend = admin_spend(proxies[0])["teams"]["burst"]
            if spend["by_model"].get("small", {}).get("requests", 0) == sum(r.status_code == 200 for r in responses):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        client = redis.Redis.from_url(REDIS_URL)
        accepted = _check_burst(responses, spend["spend_usd"], budget_usd, _budget_hash(client, prefix, "burst"))
        client.close()
        # Reservations are worst cases: never more than 100 held at once, so at least 100 fit.
        assert accepted >= 100
        assert slow_mock.calls() == accepted
    finally:
        for p in proxies:
            p.stop()


async def test_rate_limits_hold_across_replicas(session_tmp, mock, prefix):
    teams = _team("limited", "sk-limited", "limits: {rpm: 30}")
    policy = _policy(mock.url, prefix, teams)
    proxies = [start_proxy(session_tmp, policy, redis_url=REDIS_URL) for _ in range(3)]
    try:
        responses = await _burst([p.url for p in proxies], "sk-limited", 60)
    finally:
        for p in proxies:
            p.stop()
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    # 30 per minute; one more can fit if the burst straddles a minute boundary (sliding window).
    assert 30 <= len(ok) <= 31 and len(ok) + len(limited) == 60
    r = limited[0]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "30"
    assert ok[0].headers["x-ratelimit-limit-requests"] == "30"
    assert int(ok[0].headers["x-ratelimit-remaining-requests"]) < 30


async def test_tokens_per_minute_counts_prompt_then_completion(session_tmp, mock, prefix):
    mock.configure(reply_tokens=10)
    policy = _policy(mock.url, prefix, _team("tpm", "sk-tpm", "limits: {tpm: 60}"))
    proxy = start_proxy(session_tmp, policy, redis_url=REDIS_URL)
    try:
        statuses = []
        async with httpx.AsyncClient() as client:
            for _ in range(5):
                r = await client.post(
                    proxy.url + "/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer sk-tpm"}
                )
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.headers["x-ratelimit-limit-tokens"] == "60"
        # Each request: 8 prompt tokens up front, 10 completion tokens after: 18 per request.
        assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    finally:
        proxy.stop()


async def test_a_request_over_budget_changes_no_counters(session_tmp, mock, prefix):
    teams = _team("tiny", "sk-tiny", "budget: {usd: 0.000001, period: month}\nlimits: {rpm: 100, tpm: 10000}")
    proxy = start_proxy(session_tmp, _policy(mock.url, prefix, teams), redis_url=REDIS_URL)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.post(
                proxy.url + "/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer sk-tiny"}
            )
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
        client = redis.Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + 5
        while True:  # the rate-limit refund happens in settle, after the response
            counters = [int(client.get(k)) for k in client.scan_iter(f"{prefix}:{{t:tiny}}:rl:*")]
            if all(c == 0 for c in counters) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert counters and all(c == 0 for c in counters)
        assert not list(client.scan_iter(f"{prefix}:{{t:tiny}}:budget:*"))  # nothing reserved, nothing spent
        client.close()
        assert mock.calls() == 0
    finally:
        proxy.stop()


async def test_budget_downgrade_instead_of_reject(session_tmp, mock, prefix):
    budget = "budget: {usd: 0.0002, period: day, on_exceed: downgrade, downgrade_to: small}"
    proxy = start_proxy(
        session_tmp, _policy(mock.url, prefix, _team("thrifty", "sk-thrifty", budget)), redis_url=REDIS_URL
    )
    try:
        body = {**BODY, "model": "big"}  # big: 8 × 2.5e-6 + 32 × 10e-6 ≈ $0.00034 worst case > budget
        async with httpx.AsyncClient() as client:
            r = await client.post(
                proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-thrifty"}
            )
        assert r.status_code == 200
        assert r.headers["x-llm-proxy-model"] == "small"
        assert "budget-downgrade" in r.headers["x-llm-proxy-policies"]
    finally:
        proxy.stop()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_fail_open_journals_spend_while_redis_is_down_and_flushes_it(session_tmp, tmp_path, mock, prefix):
    own = OwnRedis(tmp_path).start()
    teams = _team("resilient", "sk-resilient", "budget: {usd: 100, period: month}\nlimits: {rpm: 1000}")
    proxy = start_proxy(session_tmp, _policy(mock.url, prefix, teams), redis_url=own.url)
    try:

        async def send(n: int) -> None:
            rs = await _burst([proxy.url], "sk-resilient", n)
            assert [r.status_code for r in rs] == [200] * n, [r.text for r in rs if r.status_code != 200]

        await send(5)
        own.stop()
        await send(5)
        assert httpx.get(proxy.url + "/readyz").status_code == 503
        assert _metric(proxy.url, "llm_proxy_store_journal_entries") > 0
        own.start()
        served = mock.stats()
        expected = (served["prompt_tokens_served"], served["completion_tokens_served"])
        deadline = time.monotonic() + 30
        while True:
            try:
                line = admin_spend(proxy)["teams"]["resilient"]["by_model"].get("small", {})
                got = (line.get("input_tokens", 0), line.get("output_tokens", 0))
            except httpx.HTTPStatusError:
                got = None
            if got == expected and _metric(proxy.url, "llm_proxy_store_journal_entries") == 0:
                break
            assert time.monotonic() < deadline, (got, expected)
            await asyncio.sleep(0.1)
        assert line["requests"] == 10
        assert httpx.get(proxy.url + "/readyz").status_code == 200
        budget_view = admin_spend(proxy)["teams"]["resilient"]["budget"]
        assert budget_view["reserved_usd"] == 0 and budget_view["limit_usd"] == 100
        assert budget_view["spent_usd"] == pytest.approx(line["spend_usd"], abs=1e-8)
        assert budget_view["remaining_usd"] == pytest.approx(100 - line["spend_usd"], abs=1e-8)
        # The budget saw every settled dollar too.
        client = own.client()
        budget = _budget_hash(client, prefix, "resilient")
        client.close()
        assert budget["reserved"] == 0
        assert budget["spent"] == pytest.approx(line["spend_usd"] * 1e9, abs=10)
    finally:
        proxy.stop()
        own.stop()


async def test_fail_closed_refuses_with_503_while_redis_is_down(session_tmp, tmp_path, mock, prefix):
    own = OwnRedis(tmp_path).start()
    teams = _team("strict", "sk-strict", "budget: {usd: 100, period: month}")
    proxy = start_proxy(session_tmp, _policy(mock.url, prefix, teams, "fail_closed"), redis_url=own.url)
    try:
        assert (await _burst([proxy.url], "sk-strict", 1))[0].status_code == 200
        own.stop()
        r = (await _burst([proxy.url], "sk-strict", 1))[0]
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        own.start()
        deadline = time.monotonic() + 15
        while (await _burst([proxy.url], "sk-strict", 1))[0].status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert mock.calls() == 2
    finally:
        proxy.stop()
        own.stop()


async def test_budget_burst_against_a_three_node_redis_cluster(session_tmp, tmp_path, slow_mock, prefix):
    cluster = OwnCluster(tmp_path).start()
    budget_usd = round(30 * WORST_CASE_USD, 9)
    policy = _policy(slow_mock.url, prefix, _team("clustered", "sk-cluster", f"budget: {{usd: {budget_usd}}}"))
    proxies = [start_proxy(session_tmp, policy, redis_url=cluster.url) for _ in range(2)]
    try:
        responses = await _burst([p.url for p in proxies], "sk-cluster", 90)
        deadline = time.monotonic() + 10
        accepted = sum(r.status_code == 200 for r in responses)
        while True:
            spend = admin_spend(proxies[1])["teams"]["clustered"]
            if spend["by_model"].get("small", {}).get("requests", 0) == accepted:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        rc = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        keys = [k for k in rc.scan_iter(match=f"{prefix}:*", target_nodes=redis.RedisCluster.ALL_NODES)]
        budget_key = next(k for k in keys if b":budget:team:" in k)
        budget = {k.decode(): int(v) for k, v in rc.hgetall(budget_key).items()}
        rc.close()
        assert _check_burst(responses, spend["spend_usd"], budget_usd, budget) >= 30
    finally:
        for p in proxies:
            p.stop()
        cluster.stop()
