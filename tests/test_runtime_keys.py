"""Runtime virtual keys through three real proxies on one real Redis: made, used, narrowed, budgeted,
rotated and revoked through `/admin/keys` (and the `keys` command), every change in the audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    ROOT,
    TEAM_KEYS,
    MockUpstream,
    Server,
    launch_proxy,
    policy_yaml,
    private_redis_keys,
    wait_for,
    wait_until_serving,
)

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
OPS_TEAM = """\
  ops:
    models: [small, big]
    budget: {usd: 5, period: day}
    limits: {rpm: 100000, tpm: 100000000}
"""


ROUTE_TO_BIG = """\
policies:
  - name: to-big
    when: {teams: [alpha], headers: {x-test-route-big: "1"}}
    route: {to: big}
"""


def _policy(mock_url: str, prefix: str) -> str:
    extra = f"store:\n  key_prefix: {prefix}\n{ROUTE_TO_BIG}"
    return policy_yaml(mock_url, extra).replace("teams:\n", "teams:\n" + OPS_TEAM, 1)


@pytest.fixture(scope="module")
def replicas(session_tmp: Path, mock_upstream: MockUpstream):
    with private_redis_keys(f"llmpkeys{uuid.uuid4().hex[:8]}") as prefix:
        servers = [launch_proxy(session_tmp, _policy(mock_upstream.url, prefix), REDIS_URL) for _ in range(3)]
        try:
            for s in servers:
                wait_until_serving(s.url + "/healthz", s.proc, timeout=90)  # three start at once on a busy machine
            yield servers
        finally:
            for s in servers:
                s.stop()


def create(server: Server, **body) -> httpx.Response:
    return httpx.post(server.url + "/admin/keys", json=body, headers=ADMIN)


def created(server: Server, **body) -> dict:
    r = create(server, **body)
    assert r.status_code == 201, r.text
    return r.json()


def chat(
    server: Server, key: str, model: str = "small", max_tokens: int = 16, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        timeout=30,
    )


def listed(server: Server) -> dict[str, dict]:
    r = httpx.get(server.url + "/admin/keys", headers=ADMIN)
    r.raise_for_status()
    return {k["id"]: k for k in r.json()["keys"]}


def audit(server: Server) -> list[dict]:
    r = httpx.get(server.url + "/admin/audit", params={"limit": 10000}, headers=ADMIN)
    r.raise_for_status()
    return r.json()["entries"]


def error_code(r: httpx.Response) -> str | None:
    return r.json()["error"]["code"]


def test_a_created_key_works_at_once_on_every_replica_and_revocation_reaches_all_within_a_second(replicas, mock):
    key = created(replicas[0], team="alpha", name="svc-search")
    assert key["key"].startswith("sk-lnp-") and "digest" not in key
    for server in replicas:  # the other replicas have never seen it: the first request must work all the same
        r = chat(server, key["key"])
        assert r.status_code == 200, r.text
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=key["key"], max_retries=0)
        assert sdk.chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}]).choices
    for server in replicas:  # policy-file keys are untouched
        assert chat(server, TEAM_KEYS["alpha"]).status_code == 200

    r = httpx.delete(replicas[1].url + f"/admin/keys/{key['id']}", headers=ADMIN)
    assert r.status_code == 200, r.text
    for server in replicas:  # polled from the moment the revocation answered: one second for all three
        wait_for(lambda s=server: chat(s, key["key"]).status_code == 401, f"revocation on {server.url}", timeout=1.0)
    for server in replicas:
        r = chat(server, key["key"])
        assert r.status_code == 401 and error_code(r) == "key_revoked", r.text
    assert listed(replicas[2])[key["id"]]["state"] == "revoked"
    again = httpx.delete(replicas[0].url + f"/admin/keys/{key['id']}", headers=ADMIN)
    assert again.status_code == 409 and error_code(again) == "key_revoked"


def test_a_key_narrows_its_teams_models(replicas, mock):
    key = created(replicas[0], team="alpha", name="small-only", models=["small"])
    assert chat(replicas[1], key["key"], "small").status_code == 200
    r = chat(replicas[2], key["key"], "big")
    assert r.status_code == 403 and "key may not use" in r.json()["error"]["message"]
    sdk = openai.OpenAI(base_url=replicas[1].url + "/v1", api_key=key["key"], max_retries=0)
    assert [m.id for m in sdk.models.list().data] == ["small"]
    assert chat(replicas[2], TEAM_KEYS["alpha"], "big").status_code == 200  # the team itself keeps big


def test_neither_a_route_nor_a_fallback_moves_a_key_to_a_model_it_may_not_use(replicas, mock):
    key = created(replicas[0], team="alpha", name="no-big", models=["small", "flaky"])
    route = {"x-test-route-big": "1"}
    # The team's own key is routed to big; the narrowed key stays on the model it asked for.
    assert chat(replicas[0], TEAM_KEYS["alpha"], "small", headers=route).headers["x-llm-proxy-model"] == "big"
    r = chat(replicas[1], key["key"], "small", headers=route)
    assert r.status_code == 200 and r.headers["x-llm-proxy-model"] == "small", r.text
    assert "to-big" not in r.headers.get("x-llm-proxy-policies", "")
    assert mock.stats()["last_bodies"][-1]["model"] == "mock-small"

    # flaky falls back to small: allowed for this key. A key without small gets flaky's own error instead.
    mock.fault(status=500, count=3, model="mock-flaky")
    r = chat(replicas[2], key["key"], "flaky")
    assert r.status_code == 200 and mock.stats()["last_bodies"][-1]["model"] == "mock-small", r.text
    flaky_only = created(replicas[0], team="alpha", name="flaky-only", models=["flaky"])
    mock.reset()
    mock.fault(status=500, count=3, model="mock-flaky")
    r = chat(replicas[2], flaky_only["key"], "flaky")
    assert r.status_code >= 500, r.text
    assert all(b["model"] == "mock-flaky" for b in mock.stats()["last_bodies"])


def test_a_keys_budget_holds_under_a_concurrent_burst_across_replicas(replicas, mock):
    mock.configure(latency_ms=150)  # the burst's requests overlap: reservations, not settlements, must hold
    budget = 0.01
    key = created(replicas[0], team="ops", name="burst", models=["big"], budget={"usd": budget, "period": "day"})
    # Each request reserves its worst case (200 output tokens of big: $0.002+), so at most 4 fit at once.
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda i: chat(replicas[i % 3], key["key"], "big", 200), range(30)))
    statuses = [r.status_code for r in results]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    assert all(error_code(r) == "budget_exceeded" for r in results if r.status_code == 429)
    state = wait_for(lambda: listed(replicas[1])[key["id"]]["budget_state"], "the key's budget state")
    assert state["spent_usd"] <= budget and state["reserved_usd"] == 0
    billed = sum(float(r.headers["x-llm-proxy-cost-usd"]) for r in results if r.status_code == 200)
    assert state["spent_usd"] == pytest.approx(billed, abs=1e-8)
    # Spend and last use reach the listing within a flush (about a second), from every replica's requests.
    row = wait_for(
        lambda: (r := listed(replicas[2])[key["id"]])["spend_usd"] >= billed - 1e-8 and r, "the key's spend listed"
    )
    assert row["last_used_at"] is not None and row["spend_usd"] == pytest.approx(billed, abs=1e-8)


def test_rotation_follows_the_grace_period(replicas, mock):
    key = created(replicas[0], team="alpha", name="rotating")
    r = httpx.post(replicas[1].url + f"/admin/keys/{key['id']}/rotate", json={"grace_s": 0}, headers=ADMIN)
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["id"] == key["id"] and second["key"] != key["key"] and second["fingerprint"] != key["fingerprint"]
    for server in replicas:
        assert chat(server, second["key"]).status_code == 200
        wait_for(lambda s=server: chat(s, key["key"]).status_code == 401, "the old key refused", timeout=1.0)
        assert error_code(chat(server, key["key"])) == "key_rotated"

    r = httpx.post(replicas[2].url + f"/admin/keys/{key['id']}/rotate", json={"grace_s": 3}, headers=ADMIN)
    third = r.json()
    for server in replicas:  # inside the grace period both work
        assert chat(server, second["key"]).status_code == 200
        assert chat(server, third["key"]).status_code == 200
    for server in replicas:  # after it, the old one is refused (polled: no sleep)
        wait_for(lambda s=server: chat(s, second["key"]).status_code == 401, "grace to end", timeout=10)
        assert chat(server, third["key"]).status_code == 200


def test_an_expired_key_is_refused_and_spent_keys_cannot_be_rotated(replicas, mock):
    key = created(replicas[0], team="alpha", name="short-lived", expires_at=time.time() + 2)
    assert chat(replicas[1], key["key"]).status_code == 200
    wait_for(lambda: chat(replicas[1], key["key"]).status_code == 401, "expiry", timeout=10)
    assert error_code(chat(replicas[2], key["key"])) == "key_expired"
    assert listed(replicas[0])[key["id"]]["state"] == "expired"
    r = httpx.post(replicas[0].url + f"/admin/keys/{key['id']}/rotate", headers=ADMIN)
    assert r.status_code == 409 and error_code(r) == "key_expired"
    r = httpx.post(replicas[0].url + "/admin/keys/vknope/rotate", headers=ADMIN)
    assert r.status_code == 404


BAD_KEYS = [
    ({"team": "nobody", "name": "x"}, 404, "team_not_found"),
    ({"team": "alpha", "name": "x", "models": ["gpt-9"]}, 404, "model_not_found"),
    ({"team": "beta", "name": "x", "models": ["big"]}, 400, "model_not_allowed"),
    ({"team": "ops", "name": "x", "budget": {"usd": 50, "period": "day"}}, 400, "budget_too_large"),
    ({"team": "ops", "name": "x", "limits": {"rpm": 10**6}}, 400, "limit_too_large"),
    ({"team": "alpha", "name": "x", "expires_at": 1_000_000}, 400, "expiry_in_past"),
    ({"team": "alpha", "name": "x", "expires_at": "2001-01-01T00:00:00Z"}, 400, "expiry_in_past"),
    ({"team": "alpha", "name": "x", "metadata": {"blob": "x" * 5000}}, 400, "metadata_too_large"),
    ({"team": "alpha", "name": "x", "metadata": ["not", "an", "object"]}, 400, "invalid_key_request"),
    ({"team": "alpha", "name": "x", "metadata": "text"}, 400, "invalid_key_request"),
    ({"team": "alpha", "name": "x\nforged log line"}, 400, "invalid_key_request"),
    ({"team": "alpha", "name": "x", "models": []}, 400, "invalid_key_request"),
    ({"team": "alpha", "name": "x", "api_base": "http://evil"}, 400, "invalid_key_request"),
    ({"team": "alpha", "name": "x", "budget": {"usd": -1}}, 400, "invalid_key_request"),
]


def test_bad_key_requests_get_a_clear_4xx_and_store_nothing(replicas):
    before_keys, before_audit = listed(replicas[0]), audit(replicas[0])
    for body, status, code in BAD_KEYS:
        r = create(replicas[0], **body)
        assert r.status_code == status and error_code(r) == code, (body, r.text)
        assert r.json()["error"]["message"]
    json_type = {**ADMIN, "content-type": "application/json"}
    r = httpx.post(replicas[0].url + "/admin/keys", content=b"{nope", headers=json_type)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(replicas[0].url + "/admin/keys", content=b"x" * 70_000, headers=ADMIN)
    assert r.status_code == 413
    r = httpx.post(replicas[0].url + "/admin/keys", json={"team": "alpha", "name": "x"})  # no master key
    assert r.status_code == 401
    # No key was added (usage of earlier keys may still be landing: ids only) and no change was audited.
    assert listed(replicas[0]).keys() == before_keys.keys() and audit(replicas[0]) == before_audit


def test_the_audit_log_has_every_change_and_no_secret(replicas, mock):
    key = created(replicas[0], team="alpha", name="audited", metadata={"owner": "search-team"})
    rotated = httpx.post(replicas[1].url + f"/admin/keys/{key['id']}/rotate", json={"grace_s": 0}, headers=ADMIN)
    assert httpx.delete(replicas[2].url + f"/admin/keys/{key['id']}", headers=ADMIN).status_code == 200
    assert httpx.post(replicas[0].url + "/admin/reload", headers=ADMIN).status_code == 200
    entries = audit(replicas[1])  # one log for every replica
    mine = [e for e in entries if e.get("key_id") == key["id"]]
    assert [e["action"] for e in mine] == ["key.create", "key.rotate", "key.revoke"]
    assert entries[-1]["action"] == "POST /admin/reload"
    assert all(e["by"].startswith("master:") and e["at"] > 0 for e in entries)
    text = json.dumps(entries)
    for secret in (key["key"], rotated.json()["key"], MASTER_KEY):
        assert secret not in text and secret[7:] not in text
    assert "sha256:" not in text  # not even the digests
    listing = httpx.get(replicas[0].url + "/admin/keys", headers=ADMIN).text
    assert key["key"] not in listing and "sha256:" not in listing and "digest" not in listing


def test_the_keys_command_drives_the_api(replicas, mock):
    env = {"LLM_PROXY_MASTER_KEY": MASTER_KEY, "PATH": "/usr/bin:/bin"}

    def keys(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "keys", "--url", replicas[0].url, *args],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)

    made = keys("create", "--team", "ops", "--name", "cli", "--models", "small", "--budget-usd", "1", "--rpm", "10")
    assert made["models"] == ["small"] and made["budget"] == {"usd": 1.0, "period": "month"}
    assert chat(replicas[1], made["key"]).status_code == 200
    assert made["id"] in {k["id"] for k in keys("list", "--team", "ops")["keys"]}
    new = keys("rotate", made["id"])
    assert chat(replicas[2], new["key"]).status_code == 200
    assert keys("revoke", made["id"])["state"] == "revoked"
    wait_for(lambda: chat(replicas[2], new["key"]).status_code == 401, "revocation", timeout=1.0)
    bad = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keys", "--url", replicas[0].url, "create", "--team", "no", "--name", "x"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "HTTP 404" in bad.stderr and "'no'" in bad.stderr


def test_with_the_memory_store_key_endpoints_name_redis_and_the_audit_log_still_works(proxy):
    r = httpx.post(proxy.url + "/admin/keys", json={"team": "alpha", "name": "x"}, headers=ADMIN)
    assert r.status_code == 409 and "LLM_PROXY_REDIS_URL" in r.json()["error"]["message"]
    assert httpx.get(proxy.url + "/admin/keys", headers=ADMIN).status_code == 409
    assert httpx.post(proxy.url + "/admin/reload", headers=ADMIN).status_code == 200
    entries = httpx.get(proxy.url + "/admin/audit", headers=ADMIN).json()["entries"]
    assert entries[-1]["action"] == "POST /admin/reload"
    # A key that only looks like a runtime key is just an invalid key here.
    assert (
        httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer sk-lnp-doesnotexist"},
        ).status_code
        == 401
    )
