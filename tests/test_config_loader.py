"""Policy files: env interpolation, validation errors with file:line and field, `check` exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import pytest

from proxy.config import ConfigError, parse_policy_text
from tests.conftest import ROOT, TEAM_KEYS, start_proxy


def _issues(text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_policy_text(textwrap.dedent(text), "p.yaml", env or {})
    return [str(i) for i in e.value.issues]


def test_env_interpolation_with_defaults():
    policy = parse_policy_text(
        "models:\n  m:\n    api_key: ${KEY}\n    api_base: ${BASE:-http://localhost:1/v1}\n", "p.yaml", {"KEY": "k1"}
    )
    assert policy.models["m"].api_key == "k1"
    assert policy.models["m"].api_base == "http://localhost:1/v1"


def test_missing_env_var_is_an_error_with_its_line():
    assert _issues("models:\n  m:\n    api_key: ${NOPE}\n") == [
        "p.yaml:3: models.m.api_key: environment variable NOPE is not set (use ${NOPE:-default})"
    ]


def test_every_error_is_listed_with_line_and_field():
    issues = _issues(
        """\
        version: 1
        models:
          a:
            provider: openai
            pricee: {input_per_mtok: 1}
            fallbacks: [zzz]
          b:
            price: {input_per_mtok: -1}
            timeout_s: fast
        teams:
          t:
            keys: ["sha256:abc"]
            models: [nope]
        """
    )
    assert "p.yaml:5: models.a.pricee: unknown key" in issues
    assert any(i.startswith("p.yaml:8: models.b.price.input_per_mtok:") for i in issues)
    assert any(i.startswith("p.yaml:9: models.b.timeout_s:") for i in issues)
    assert any(i.startswith("p.yaml:12: teams.t.keys:") for i in issues)


def test_cross_references_are_checked():
    issues = _issues(
        """\
        models:
          a: {fallbacks: [zzz]}
        teams:
          t: {keys: [k1], models: [nope]}
          u: {keys: [k1]}
        """
    )
    assert "p.yaml:2: models.a.fallbacks[0]: unknown model 'zzz'" in issues
    assert "p.yaml:4: teams.t.models[0]: unknown model 'nope'" in issues
    assert "p.yaml:5: teams.u.keys[0]: key also belongs to team 't'" in issues


def test_yaml_syntax_error_names_the_line():
    issues = _issues("models:\n  a: {provider: openai\n  b: 1\n")
    assert len(issues) == 1 and issues[0].startswith("p.yaml:3: (root): YAML syntax error")


def test_duplicate_keys_are_errors():
    assert "p.yaml:3: models.a: duplicate key" in _issues("models:\n  a: {}\n  a: {}\n")


def _check(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )


def test_check_accepts_the_default_policy():
    r = _check(ROOT / "policies" / "default.yaml")
    assert r.returncode == 0, r.stderr


def test_check_exits_1_and_lists_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a:\n    provider: openai\n    bogus: 1\n    api_base: ftp://x\n")
    r = _check(bad)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert f"{bad}:4: models.a.bogus: unknown key" in lines
    assert any(line.startswith(f"{bad}:5: models.a.api_base:") for line in lines)


def test_examples_are_valid():
    for path in (ROOT / "policies").rglob("*.yaml"):
        r = _check(path)
        assert r.returncode == 0, f"{path}: {r.stderr}"


def test_check_refuses_a_provider_litellm_does_not_know(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("models:\n  claude:\n    provider: antropic\n    api_key: ${KEY:-x}\n")
    r = _check(bad)
    assert r.returncode == 1, r.stdout
    assert r.stderr.strip().splitlines() == [
        f"{bad}:3: models.claude.provider: unknown provider 'antropic' (did you mean 'anthropic'?)"
    ]


def test_check_reports_field_errors_and_cross_references_in_one_pass(tmp_path):
    bad = tmp_path / "layers.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            models:
              a: {timeout_s: fast, fallbacks: [zzz]}
              b: {bogus: 1}
            teams:
              t: {keys: [k1], models: [nope, b]}
            policies:
              - {name: p1, retrieve: {}}
              - {name: p2, when: {teams: [ghost]}, reject: {}}
            """
        )
    )
    r = _check(bad)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}:2: models.a.timeout_s:") for line in lines)
    assert f"{bad}:3: models.b.bogus: unknown key" in lines
    assert any(line.startswith(f"{bad}:7: policies[0].retrieve.collection: Field required") for line in lines)
    # the cross-references of everything else, in the same pass
    assert f"{bad}:2: models.a.fallbacks[0]: unknown model 'zzz'" in lines
    assert f"{bad}:5: teams.t.models[0]: unknown model 'nope'" in lines
    assert f"{bad}:8: policies[1].when.teams[0]: unknown team 'ghost'" in lines
    # no echo of what was left out to check the rest (model b, the half-written policy)
    assert len(lines) == 6, lines


def test_check_warns_on_plaintext_keys_and_globs_that_match_nothing_and_still_passes(tmp_path):
    path = tmp_path / "warn.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            models:
              gpt-4o: {api_key: sk-written-here}
              local: {api_key: "${LOCAL_KEY:-none}", api_base: "http://127.0.0.1:1/v1"}
            teams:
              t:
                keys: [sk-team-plain, "sha256:%s"]
                models: ["gpt-4*", "claude-*"]
            """
            % ("0" * 64)
        )
    )
    r = _check(path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"{path}:2: models.gpt-4o.api_key: warning: the key is written in the file: use ${{ENV_VAR}} instead",
        f"{path}:6: teams.t.keys[0]: warning: a plaintext virtual key: store its hash instead "
        "(llm-numbers-proxy hash-key KEY)",
        f"{path}:7: teams.t.models[1]: warning: 'claude-*' matches no model under models:",
    ]
    assert r.stdout.strip() == f"{path}: OK (2 models, 1 teams, 0 policies, 3 warnings)"


def test_a_model_misconfigured_on_the_proxy_is_a_500_naming_it_not_a_client_error(tmp_path, mock):
    policy = textwrap.dedent(
        f"""\
        models:
          claude:
            provider: anthropic
            api_base: {mock.url}
            upstream_model: claude-3-5-haiku-20241022
            price: {{input_per_mtok: 0.8, output_per_mtok: 4}}
        teams:
          alpha: {{keys: [{TEAM_KEYS["alpha"]}]}}
        """
    )
    # no api_key in the file and none in the environment: litellm refuses before calling anything
    server = start_proxy(tmp_path, policy, env={"ANTHROPIC_API_KEY": ""})
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
            json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
    finally:
        server.stop()
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_misconfigured" and error["type"] == "api_error"
    assert "'claude'" in error["message"] and "api_key" in error["message"]
    assert mock.calls("/v1/messages") == 0
    assert "Provider List" not in server.log()  # litellm's banner stays out of the proxy's log
