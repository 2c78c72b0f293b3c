"""The policy engine through the real server: matchers, reject / set / route actions, explain."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx
import openai
import pytest

from tests.conftest import ROOT, TEAM_KEYS, client_for, policy_yaml, start_proxy

POLICIES = """\
tasks:
  summarize: {patterns: ["(?i)summari[sz]e", "(?i)tl;?dr"]}
policies:
  - name: no-batch-jobs
    when: {headers: {x-job-kind: batch}}
    reject: {message: "Batch jobs must use the batch API.", status: 403}
  - name: cap-output
    when: {teams: [alpha], models: ["big"]}
    set: {max_tokens: {max: 20, default: 12}, temperature: {default: 0.1}}
  - name: cheap-summaries
    when: {task: summarize}
    route: {to: small, min_cost_multiple: 10}
  - name: too-pricey-multiple
    when: {teams: [alpha], headers: {x-try-expensive-rule: "1"}}
    route: {to: flaky, min_cost_multiple: 100}
  - name: long-prompts-to-small
    when: {prompt_tokens: {min: 500}, tools: false, stream: false}
    route: {to: small}
"""


@pytest.fixture(scope="module")
def policy_proxy(session_tmp, mock_upstream):
    server = start_proxy(session_tmp, policy_yaml(mock_upstream.url, POLICIES))
    yield server
    server.stop()


def test_reject_by_header_answers_403_without_upstream_call(policy_proxy, mock):
    raw = httpx.post(
        policy_proxy.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "x-job-kind": "batch"},
        json={"model": "small", "messages": [{"role": "user", "content": "x"}]},
    )
    assert raw.status_code == 403
    assert raw.json()["error"] == {
        "message": "Batch jobs must use the batch API.",
        "type": "invalid_request_error",
        "param": None,
        "code": "policy_rejected",
    }
    assert raw.headers["x-llm-proxy-policies"] == "no-batch-jobs"
    assert mock.calls() == 0


def test_set_defaults_and_clamps_fields(policy_proxy, mock):
    raw = client_for(policy_proxy).chat.completions.with_raw_response.create(
        model="big", messages=[{"role": "user", "content": "hello"}], max_tokens=500
    )
    assert raw.headers["x-llm-proxy-policies"] == "cap-output"
    sent = mock.stats()["last_bodies"][-1]
    assert sent["max_tokens"] == 20 and sent["temperature"] == 0.1
    client_for(policy_proxy).chat.completions.create(model="big", messages=[{"role": "user", "content": "hi"}])
    assert mock.stats()["last_bodies"][-1]["max_tokens"] == 12
    # Another team is untouched.
    client_for(policy_proxy, "beta").chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}])
    assert "max_tokens" not in mock.stats()["last_bodies"][-1]


def test_route_by_task_when_the_cost_multiple_holds(policy_proxy, mock):
    raw = client_for(policy_proxy).chat.completions.with_raw_response.create(
        model="big", messages=[{"role": "user", "content": "Please summarise this memo."}]
    )
    assert raw.headers["x-llm-proxy-model"] == "small"
    assert raw.headers["x-llm-proxy-policies"] == "cap-output,cheap-summaries"
    assert raw.parse().model == "mock-small"  # the answer says who answered
    assert mock.stats()["last_bodies"][-1]["model"] == "mock-small"
    u = raw.parse().usage
    real = u.prompt_tokens * 0.15e-6 + u.completion_tokens * 0.6e-6
    counterfactual = u.prompt_tokens * 2.5e-6 + u.completion_tokens * 10e-6
    assert float(raw.headers["x-llm-proxy-cost-usd"]) == pytest.approx(real, abs=1e-9)
    assert float(raw.headers["x-llm-proxy-saved-usd"]) == pytest.approx(counterfactual - real, abs=1e-9)


def test_route_is_skipped_when_the_cost_multiple_does_not_hold(policy_proxy, mock):
    # big costs ~7x flaky here, below the rule's 100x.
    raw = client_for(policy_proxy).chat.completions.with_raw_response.create(
        model="big", messages=[{"role": "user", "content": "x"}], extra_headers={"x-try-expensive-rule": "1"}
    )
    assert raw.headers["x-llm-proxy-model"] == "big"
    assert "too-pricey-multiple" not in raw.headers["x-llm-proxy-policies"]


def test_prompt_token_range_matcher(policy_proxy, mock):
    long_text = "lorem ipsum " * 300
    raw = client_for(policy_proxy, "beta").chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": long_text}]
    )
    assert raw.headers["x-llm-proxy-model"] == "small"  # already small: route does not apply
    raw = client_for(policy_proxy).chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": long_text}]
    )
    assert raw.headers["x-llm-proxy-model"] == "small"
    assert raw.headers["x-llm-proxy-policies"] == "long-prompts-to-small"


def test_policy_metric_counts_applications(policy_proxy, mock):
    client_for(policy_proxy).chat.completions.create(
        model="big", messages=[{"role": "user", "content": "tl;dr of the thread"}]
    )
    metrics = httpx.get(policy_proxy.url + "/metrics").text
    assert 'llm_proxy_policy_applied_total{action="route",policy="cheap-summaries"}' in metrics


def test_explain_endpoint_decides_without_calling_upstream(policy_proxy, mock):
    r = httpx.post(
        policy_proxy.url + "/v1/proxy/explain",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
        json={"model": "big", "messages": [{"role": "user", "content": "Summarize the doc"}], "max_tokens": 100},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["decision"] == "upstream"
    assert out["team"] == "alpha" and out["model_requested"] == "big" and out["model"] == "small"
    assert out["policies"] == ["cap-output", "cheap-summaries"]
    assert out["max_output_tokens"] == 20
    assert out["cost_estimate_usd"] == pytest.approx(out["prompt_tokens"] * 0.15e-6 + 20 * 0.6e-6)
    assert out["saved_usd"] > 0
    assert mock.stats()["calls"] == {}
    assert httpx.post(policy_proxy.url + "/v1/proxy/explain", json={"model": "big"}).status_code == 401


def _policy_file(tmp_path, mock_url: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(mock_url, POLICIES))
    return str(path)


def test_explain_cli(tmp_path, mock_upstream):
    body = json.dumps({"model": "big", "messages": [{"role": "user", "content": "summarize"}]})
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "explain",
            "--config",
            _policy_file(tmp_path, mock_upstream.url),
            "--key",
            TEAM_KEYS["alpha"],
        ],
        input=body,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "small" and out["policies"] == ["cap-output", "cheap-summaries"]


def test_replay_projects_spend_and_savings(tmp_path, mock_upstream):
    traffic = tmp_path / "traffic.jsonl"
    lines = [
        {
            "team": "alpha",
            "model": "big",
            "messages": [{"role": "user", "content": "summarize this"}],
            "usage": {"completion_tokens": 10},
        },
        {
            "team": "alpha",
            "model": "big",
            "messages": [{"role": "user", "content": "hello"}],
            "usage": {"completion_tokens": 10},
        },
        {"team": "beta", "model": "small", "messages": [{"role": "user", "content": "hi"}]},
        {"team": "beta", "model": "big", "messages": [{"role": "user", "content": "not allowed"}]},
    ]
    traffic.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "replay",
            str(traffic),
            "--config",
            _policy_file(tmp_path, mock_upstream.url),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 1, r.stderr  # the broken line could not be replayed
    assert "1 line of" in r.stderr and "could not be replayed" in r.stderr
    report = json.loads(r.stdout)
    assert report["totals"]["requests"] == 3
    assert report["totals"]["rejected"] == 1 and report["totals"]["failed"] == 1  # the forbidden one; the broken one
    assert report["by_policy"]["cheap-summaries"]["requests"] == 1
    assert report["by_policy"]["cheap-summaries"]["saved_usd"] > 0
    assert report["by_model"]["big"]["requests"] == 1 and report["by_model"]["small"]["requests"] == 2
    assert report["totals"]["saved_usd"] == pytest.approx(report["by_policy"]["cheap-summaries"]["saved_usd"])
    assert [e["line"] for e in report["errors"]] == [5]
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "replay",
            str(traffic),
            "--config",
            _policy_file(tmp_path, mock_upstream.url),
            "--format",
            "table",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "cheap-summaries" in table.stdout


def test_request_log_is_replayable_and_has_no_prompt_text(tmp_path, mock_upstream):
    log_path = tmp_path / "requests.jsonl"
    server = start_proxy(tmp_path, policy_yaml(mock_upstream.url, POLICIES + f"log:\n  requests: {log_path}\n"))
    try:
        client = client_for(server)
        client.chat.completions.create(model="big", messages=[{"role": "user", "content": "SECRET summarize"}])
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "SECRET hello"}])
        client.embeddings.create(model="embed", input=["SECRET one", "SECRET two"])
        client.completions.create(model="small", prompt="SECRET complete", max_tokens=5)
        with pytest.raises(openai.PermissionDeniedError):  # beta may not use big: logged as a 403
            client_for(server, "beta").chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
    finally:
        server.stop()  # flushes the log
    text = log_path.read_text()
    assert "SECRET" not in text and TEAM_KEYS["alpha"] not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["body"]["model"] for r in records] == ["big", "small", "embed", "small", "big"]
    assert [r["endpoint"] for r in records] == ["chat", "chat", "embeddings", "completions", "chat"]
    assert records[0]["model_chosen"] == "small" and records[0]["prompt_tokens"] > 0

    def replay(path) -> tuple[subprocess.CompletedProcess, dict]:
        cmd = [
            sys.executable,
            "-m",
            "proxy.cli",
            "replay",
            str(path),
            "--config",
            _policy_file(tmp_path, mock_upstream.url),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        return r, json.loads(r.stdout)

    r, report = replay(log_path)
    assert r.returncode == 0, r.stderr
    assert report["errors"] == []
    assert report["totals"]["requests"] == 4 and report["totals"]["rejected"] == 1 and report["totals"]["failed"] == 0
    assert report["by_model"]["embed"]["requests"] == 1 and report["by_model"]["embed"]["spend_usd"] > 0
    # the summary stays on big: the log kept no prompt text for the summarize task to match
    assert report["by_model"]["big"]["requests"] == 1 and report["by_model"]["small"]["requests"] == 2

    log_path.write_text(text + "not json\n" + json.dumps({**records[1], "endpoint": "images"}) + "\n")
    r, report = replay(log_path)
    assert r.returncode == 1
    assert report["totals"]["requests"] == 4 and report["totals"]["failed"] == 2
    assert [e["line"] for e in report["errors"]] == [6, 7] and "unknown endpoint 'images'" in report["errors"][1][
        "error"
    ]


POLICY_ERRORS = textwrap.dedent("""\
    models:
      m: {}
    teams:
      t: {keys: [k], budget: {usd: -5}}
    tasks:
      bad: {patterns: ["(unclosed"]}
    policies:
      - name: p1
        route: {to: ghost}
      - name: p1
        reject: {}
      - name: p3
        when: {task: nope, colour: red}
        reject: {}
      - name: p4
        reject: {}
        set: {max_tokens: {max: 1}}
""")


def test_check_lists_every_policy_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(POLICY_ERRORS)
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1
    out = r.stderr
    assert f"{path}:4: teams.t.budget.usd:" in out
    assert f"{path}:6: tasks.bad.patterns:" in out and "does not compile" in out
    assert f"{path}:13: policies[2].when.colour: unknown key" in out
    assert f"{path}:15: policies[3]:" in out and "exactly one action" in out
    # Cross-reference errors are reported once the shapes are valid.
    path.write_text(
        "models:\n  m: {}\npolicies:\n  - name: p1\n    route: {to: ghost}\n  - name: p1\n    reject: {}\n"
        "  - name: p3\n    when: {task: nope}\n    reject: {}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1
    assert f"{path}:5: policies[0].route.to: unknown model 'ghost'" in r.stderr
    assert f"{path}:6: policies[1].name: duplicate policy name 'p1'" in r.stderr
    assert f"{path}:9: policies[2].when.task: unknown task 'nope'" in r.stderr


def test_forbidden_fields_still_win_over_policies(policy_proxy, mock):
    with pytest.raises(openai.BadRequestError):
        client_for(policy_proxy).chat.completions.create(
            model="big", messages=[{"role": "user", "content": "x"}], extra_body={"api_base": "http://evil"}
        )
    assert mock.calls() == 0
