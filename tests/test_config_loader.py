"""Policy files: env interpolation, validation errors with file:line and field, `check` exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from proxy.config import ConfigError, parse_policy_text
from tests.conftest import ROOT


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
