"""A new user's first hour: the commands work outside the checkout, say their defaults, print tidy numbers,
name the model that cannot be reached, and the README says what it takes to run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from tests.conftest import ROOT, TEAM_KEYS, policy_yaml, start_proxy


def _cli(*args: str, cwd=ROOT, stdin: str | None = None) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's package, wherever the command runs from (as an installed package would be)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLM_PROXY_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True
    )


def test_the_packaged_default_policy_is_the_documented_one():
    assert (ROOT / "proxy" / "config" / "default.yaml").read_bytes() == (
        ROOT / "policies" / "default.yaml"
    ).read_bytes()


def test_explain_and_replay_outside_the_checkout_use_the_packaged_default(tmp_path):
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hello"}]})
    r = _cli("explain", "--key", "sk-demo-local", cwd=tmp_path, stdin=body)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "demo"

    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text(json.dumps({"team": "demo", "model": "demo", "messages": [{"role": "user", "content": "x"}]}))
    r = _cli("replay", str(traffic), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["requests"] == 1


def test_serve_help_shows_the_defaults():
    r = _cli("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "(default: 4000)" in text and "(default: 127.0.0.1)" in text and "(default: policies/default.yaml)" in text
    assert "(default: 25.0)" in text and "(default: info)" in text


def test_explain_prints_prices_without_float_noise():
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "summarize " + "word " * 37}]})
    r = _cli("explain", "--key", "sk-demo-local", stdin=body)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    floats = [v for v in out.values() if isinstance(v, float)] + list(out["saved_by_policy"].values())
    assert out["saved_usd"] > 0 and floats
    assert all(v == float(f"{v:.12g}") for v in floats), floats  # 12 significant digits: no 0.00015659999999999998


def test_an_unreachable_upstream_error_names_the_model_and_what_to_check(tmp_path, mock):
    gone = (
        "  gone:\n    api_base: http://127.0.0.1:9/v1\n    price: {input_per_mtok: 1}\n    retries: {max_attempts: 1}\n"
    )
    server = start_proxy(tmp_path, policy_yaml(mock.url).replace("models:\n", "models:\n" + gone, 1))
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
            json={"model": "gone", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
    finally:
        server.stop()
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "model 'gone'" in message and "models.gone.api_base" in message, message


def test_the_readme_says_the_port_what_the_tests_install_and_names_no_missing_file():
    readme = (ROOT / "README.md").read_text()
    assert "127.0.0.1:4000" in readme and "--port" in readme
    for installed in ("torch", "redis-server", "Prometheus", "npm", "tests/node/node_modules"):
        assert installed in readme, installed
    assert "DESIGN.md" not in readme or (ROOT / "DESIGN.md").exists()


def test_the_default_policy_documents_every_server_setting():
    from proxy.config.models import ServerConfig

    text = (ROOT / "policies" / "default.yaml").read_text()
    server_block = text.split("\nserver:\n", 1)[1].split("\n\n", 1)[0]
    for name in ServerConfig.model_fields:
        assert f"  {name}:" in server_block, f"server.{name} is not documented in policies/default.yaml"
