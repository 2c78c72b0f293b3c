"""Cost policies through the real server: conciseness with a measured hold-out, routing by cost
multiple and budget pressure, and savings that reconcile with usage."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import MASTER_KEY, ROOT, TEAM_KEYS, client_for, policy_yaml, start_proxy

INSTRUCTION = "Be concise."

CONCISE = """\
policies:
  - name: concise-system
    when: {headers: {x-placement: system}}
    concise: {holdout: 0}
  - name: concise-append
    when: {headers: {x-placement: append_system}}
    concise: {holdout: 0, placement: append_system, max_tokens: 300}
  - name: concise-user
    when: {headers: {x-placement: user}}
    concise: {holdout: 0, placement: user}
  - name: concise-holdout-all
    when: {headers: {x-placement: holdout}}
    concise: {holdout: 1}
  - name: concise-twice
    when: {headers: {x-placement: twice}}
    concise: {holdout: 0, placement: user}
"""


@pytest.fixture(scope="module")
def concise_proxy(session_tmp, mock_upstream):
    # A second policy matching `twice` checks the instruction lands exactly once.
    extra = (
        CONCISE
        + "  - name: concise-twice-again\n    when: {headers: {x-placement: twice}}\n    concise: {holdout: 0}\n"
    )
    server = start_proxy(session_tmp, policy_yaml(mock_upstream.url, extra))
    yield server
    server.stop()


def _send(proxy, placement: str, messages: list[dict], **kw):
    return client_for(proxy).chat.completions.with_raw_response.create(
        model="small", messages=messages, extra_headers={"x-placement": placement}, **kw
    )


CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is a proxy?"},
    {"role": "assistant", "content": "A go-between."},
    {"role": "user", "content": [{"type": "text", "text": "Say more."}]},
]


def test_instruction_as_a_new_system_message(concise_proxy, mock):
    raw = _send(concise_proxy, "system", CONVERSATION)
    sent = mock.stats()["last_bodies"][-1]["messages"]
    assert sent == [{"role": "system", "content": INSTRUCTION}, *CONVERSATION]
    assert raw.headers["x-llm-proxy-policies"] == "concise-system"


def test_instruction_appended_to_the_system_message(concise_proxy, mock):
    _send(concise_proxy, "append_system", CONVERSATION)
    body = mock.stats()["last_bodies"][-1]
    assert body["messages"][0] == {"role": "system", "content": "You are helpful.\n\nBe concise."}
    assert body["messages"][1:] == CONVERSATION[1:]
    assert body["max_tokens"] == 300  # the policy's default, as the client set none


def test_instruction_appended_to_the_last_user_message(concise_proxy, mock):
    _send(concise_proxy, "user", CONVERSATION)
    sent = mock.stats()["last_bodies"][-1]["messages"]
    assert sent[:3] == CONVERSATION[:3]
    assert sent[3] == {
        "role": "user",
        "content": [{"type": "text", "text": "Say more."}, {"type": "text", "text": INSTRUCTION}],
    }


def test_instruction_arrives_exactly_once(concise_proxy, mock):
    raw = _send(concise_proxy, "twice", CONVERSATION)
    sent = mock.stats()["last_bodies"][-1]["messages"]
    assert str(sent).count(INSTRUCTION) == 1
    assert raw.headers["x-llm-proxy-policies"] == "concise-twice,concise-twice-again"
    already = [{"role": "user", "content": "Be concise. What is DNS?"}]
    _send(concise_proxy, "system", already)
    assert mock.stats()["last_bodies"][-1]["messages"] == already


def test_holdout_requests_are_untouched(concise_proxy, mock):
    raw = _send(concise_proxy, "holdout", CONVERSATION)
    assert mock.stats()["last_bodies"][-1]["messages"] == CONVERSATION
    assert raw.headers["x-llm-proxy-holdout"] == "concise-holdout-all"


def test_json_tools_and_opt_out_are_skipped(concise_proxy, mock):
    msgs = [{"role": "user", "content": "hi"}]
    _send(concise_proxy, "system", msgs, response_format={"type": "json_object"})
    assert mock.stats()["last_bodies"][-1]["messages"] == msgs
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    _send(concise_proxy, "system", msgs, tools=tools)
    assert mock.stats()["last_bodies"][-1]["messages"] == msgs
    client_for(concise_proxy).chat.completions.create(
        model="small", messages=msgs, extra_headers={"x-placement": "system", "x-llm-proxy-no-concise": "1"}
    )
    assert mock.stats()["last_bodies"][-1]["messages"] == msgs


def test_malformed_messages_are_rejected_before_injection(concise_proxy, mock):
    r = httpx.post(
        concise_proxy.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "x-placement": "system"},
        json={"model": "small", "messages": [{"role": "user", "content": 5}]},
    )
    assert r.status_code == 400 and mock.calls() == 0


MEASURED = """\
policies:
  - name: be-concise
    when: {models: [big]}
    concise: {holdout: 0.5, min_samples: 10}
"""


def _savings(proxy) -> dict:
    r = httpx.get(proxy.url + "/admin/savings", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    r.raise_for_status()
    return r.json()


def test_realised_saving_is_measured_against_the_holdout_and_prices_treated_requests(session_tmp, mock):
    mock.configure(reply_tokens=60, length_jitter=0.3, concise_ratio=0.5)
    proxy = start_proxy(session_tmp, policy_yaml(mock.url, MEASURED))
    try:
        client = client_for(proxy)
        arms = {"holdout": 0, "treated": 0}
        for i in range(80):
            raw = client.chat.completions.with_raw_response.create(
                model="big", messages=[{"role": "user", "content": f"Explain topic number {i} in detail."}]
            )
            arms["holdout" if "x-llm-proxy-holdout" in raw.headers else "treated"] += 1
        est = _savings(proxy)["conciseness"]["be-concise"]["by_model"]["big"]
        assert est["treated"]["n"] == arms["treated"] and est["holdout"]["n"] == arms["holdout"]
        assert min(arms.values()) >= 20  # a 50% hold-out over 80 requests
        low, high = est["ci95"]
        assert low < 0.5 < high and 0.35 < est["saving"] < 0.65 and high - low < 0.3
        assert est["used_for_savings"] is True
        # Treated requests now carry a saved-USD figure from the realised ratio.
        deadline = time.monotonic() + 15
        while True:
            raw = client.chat.completions.with_raw_response.create(
                model="big", messages=[{"role": "user", "content": "One more question, please."}]
            )
            saved = float(raw.headers["x-llm-proxy-saved-usd"])
            if saved > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the estimate is cached for a few seconds per replica
        assert saved > 0 and raw.headers["x-llm-proxy-policies"] == "be-concise"
        ratio = 1 - _savings(proxy)["conciseness"]["be-concise"]["by_model"]["big"]["saving"]
        out = raw.parse().usage.completion_tokens
        assert saved == pytest.approx((out / ratio - out) * 10e-6, rel=0.15)
        report = _savings(proxy)
        assert report["by_policy"]["be-concise"]["saved_usd"] > 0
        assert report["totals"]["counterfactual_usd"] == pytest.approx(
            report["totals"]["spend_usd"] + report["totals"]["saved_usd"]
        )
    finally:
        proxy.stop()


ROUTING = """\
policies:
  - name: pressure-chain
    when: {teams: [alpha], models: [big]}
    route:
      on_budget_pressure: [{above: 0.0001, to: flaky}, {above: 0.5, to: small}]
      fallback_to_requested: true
"""


def test_budget_pressure_chain_and_fallback_to_requested(session_tmp, mock):
    teams_with_budget = policy_yaml(mock.url, ROUTING).replace(
        '    models: ["*"]\n', '    models: ["*"]\n    budget: {usd: 0.01, period: day}\n', 1
    )
    proxy = start_proxy(session_tmp, teams_with_budget)
    try:
        client = client_for(proxy)
        first = client.chat.completions.with_raw_response.create(
            model="big", messages=[{"role": "user", "content": "x"}], max_tokens=200
        )
        # No pressure yet: nothing routes (the first request sees an empty budget).
        assert first.headers["x-llm-proxy-model"] == "big"
        second = client.chat.completions.with_raw_response.create(
            model="big", messages=[{"role": "user", "content": "x"}], max_tokens=200
        )
        assert second.headers["x-llm-proxy-model"] == "flaky"
        assert second.headers["x-llm-proxy-policies"] == "pressure-chain"
        # The routed model fails after retries: the requested one answers (its own fallback is small,
        # so fail that too to prove it is the requested model that is tried).
        mock.fault(status=500, count=10, model="mock-flaky")
        mock.fault(status=500, count=10, model="mock-small")
        third = client.chat.completions.with_raw_response.create(
            model="big", messages=[{"role": "user", "content": "x"}], max_tokens=200
        )
        assert third.headers["x-llm-proxy-model"] == "big"
        assert float(third.headers["x-llm-proxy-saved-usd"]) == 0.0
    finally:
        proxy.stop()


def test_routing_savings_reconcile_with_usage_to_the_cent(session_tmp, mock):
    policy = policy_yaml(
        mock.url,
        "policies:\n  - name: to-small\n    when: {models: [big]}\n    route: {to: small, min_cost_multiple: 10}\n",
    )
    proxy = start_proxy(session_tmp, policy)
    try:
        client = client_for(proxy)
        spent = saved = 0.0
        for i in range(20):
            raw = client.chat.completions.with_raw_response.create(
                model="big", messages=[{"role": "user", "content": f"question {i} " * (i + 1)}]
            )
            u = raw.parse().usage
            real = u.prompt_tokens * 0.15e-6 + u.completion_tokens * 0.6e-6
            counterfactual = u.prompt_tokens * 2.5e-6 + u.completion_tokens * 10e-6
            assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(real, abs=1e-9)
            assert float(raw.headers["x-llm-proxy-saved-usd"]) == pytest.approx(counterfactual - real, abs=1e-9)
            spent += real
            saved += counterfactual - real
        deadline = time.monotonic() + 5
        while _savings(proxy)["totals"]["requests"] < 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # recorded after each response
        report = _savings(proxy)
        assert report["totals"]["spend_usd"] == pytest.approx(spent, abs=0.005)
        assert report["by_policy"]["to-small"] == {"requests": 20, "saved_usd": pytest.approx(saved, abs=1e-6)}
        assert report["by_team"]["alpha"]["by_model"]["small"]["requests"] == 20
        metrics = httpx.get(proxy.url + "/metrics").text
        assert 'llm_proxy_saved_usd_total{model="big",policy="to-small",team="alpha"}' in metrics
    finally:
        proxy.stop()


BAD = {
    "min_cost_multiple: 0": ("    route: {to: small, min_cost_multiple: 0}\n", "route.min_cost_multiple"),
    "holdout 1.5": ("    concise: {holdout: 1.5}\n", "concise.holdout"),
    "team may not use": ("    route: {to: big}\n", "team 'beta' may not use 'big'"),
    "unknown price": ("    route: {to: mystery, min_cost_multiple: 5}\n", "the price of 'mystery' is unknown"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_check_rejects_bad_cost_policies(tmp_path, mock_upstream, case):
    action, expected = BAD[case]
    text = policy_yaml(mock_upstream.url, "policies:\n  - name: p\n" + action)
    text = text.replace("models:\n", "models:\n  mystery:\n    api_base: http://127.0.0.1:1/v1\n", 1)
    path = tmp_path / "p.yaml"
    path.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1 and expected in r.stderr, r.stderr
