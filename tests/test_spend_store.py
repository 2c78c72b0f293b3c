"""Spend per team and model, totals and per day, in the embedded store and in Redis."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from proxy.store.base import utc_day
from tests.conftest import MASTER_KEY, REDIS_URL, admin_spend, client_for


@pytest.fixture(params=["memory", "redis"])
def any_proxy(request, proxy, redis_proxy):
    return proxy if request.param == "memory" else redis_proxy


def test_spend_is_recorded_per_team_model_and_day(any_proxy, mock):
    before = admin_spend(any_proxy)["teams"]["beta"]
    prior_requests = before["by_model"].get("small", {}).get("requests", 0)
    prior_usd = before["spend_usd"]
    costs = []
    for i in range(3):
        raw = client_for(any_proxy, "beta").chat.completions.with_raw_response.create(
            model="small", messages=[{"role": "user", "content": f"question {i}"}]
        )
        costs.append(float(raw.headers["x-llm-proxy-cost-usd"]))
    client_for(any_proxy, "beta").embeddings.create(model="embed", input="hello")
    deadline = time.monotonic() + 5
    while True:  # recording happens after the response is sent: poll until it lands
        after = admin_spend(any_proxy)["teams"]["beta"]
        if after["by_model"].get("small", {}).get("requests", 0) - prior_requests == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    small = after["by_model"]["small"]
    assert small["requests"] - prior_requests == 3
    assert after["by_model"]["embed"]["input_tokens"] >= 1
    assert after["spend_usd"] - prior_usd == pytest.approx(sum(costs) + 1 * 0.02e-6, abs=1e-9)
    today = after["by_day"][utc_day()]
    assert today["small"]["requests"] >= 3


def test_redis_spend_is_shared_and_keys_are_hash_tagged(redis_proxy, mock, redis_prefix):
    client_for(redis_proxy, "alpha").chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}])
    r = redis.Redis.from_url(REDIS_URL)
    keys = [k.decode() for k in r.scan_iter(f"{redis_prefix}:*")]
    r.close()
    # Every key carries a hash tag (one slot per team, collection or policy in Redis Cluster).
    assert keys and all(k.count("{") == 1 and "}" in k.split("{", 1)[1] for k in keys)
    assert all("{t:" in k for k in keys if ":spend:" in k)
    assert f"{redis_prefix}:{{t:alpha}}:spend:total" in keys


def test_admin_spend_needs_the_master_key(proxy):
    assert httpx.get(proxy.url + "/admin/spend").status_code == 401
    assert httpx.get(proxy.url + "/admin/spend", headers={"Authorization": "Bearer sk-alpha-test"}).status_code == 401
    r = httpx.get(proxy.url + "/admin/spend", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status_code == 200 and r.json()["store"] == "memory"
