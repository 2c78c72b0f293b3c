"""A model's limits as the client meets them: a prompt too long for a model goes to its first
`context_window_fallbacks:` model whose window fits; `max_tokens` above the model's output cap is a 400
before any reservation; a budget 429 says when the budget resets (`Retry-After`) and every budgeted
response carries `x-ratelimit-*-budget` headers."""

from __future__ import annotations

import calendar
import hashlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from proxy.config import ConfigError, parse_policy_text
from tests.conftest import (
    ROOT,
    TEAM_KEYS,
    MockUpstream,
    Server,
    admin_spend,
    client_for,
    policy_yaml,
    start_proxy,
    team_spend,
)

POOR_KEY = "sk-poor-test"
RICH_KEY = "sk-rich-test"

MODELS = """\
  short:
    api_base: {mock}/v1
    upstream_model: mock-short
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
    max_input_tokens: 40
    max_output_tokens: 100
    context_window_fallbacks: [medium, long]
  medium:
    api_base: {mock}/v1
    upstream_model: mock-medium
    price: {{input_per_mtok: 1, output_per_mtok: 2}}
    max_input_tokens: 200
  long:
    api_base: {mock}/v1
    upstream_model: mock-long
    price: {{input_per_mtok: 2, output_per_mtok: 4}}
    max_input_tokens: 2000
    max_output_tokens: 500
  brittle:
    api_base: {mock}/v1
    upstream_model: mock-brittle
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
    fallbacks: [long]
"""


def _team(name: str, key: str, budget: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"  {name}:\n    keys: [sha256:{digest}]\n    models: [small, short, brittle]\n    budget: {budget}\n"


@pytest.fixture(scope="module")
def limits_proxy(tmp_path_factory: pytest.TempPathFactory, mock_upstream: MockUpstream) -> Iterator[Server]:
    policy = policy_yaml(mock_upstream.url)
    policy = policy.replace("models:\n", "models:\n" + MODELS.format(mock=mock_upstream.url), 1)
    teams = _team("poor", POOR_KEY, "{usd: 0.00001, period: day}") + _team("rich", RICH_KEY, "{usd: 5, period: month}")
    policy = policy.replace("teams:\n", "teams:\n" + teams, 1)
    server = start_proxy(tmp_path_factory.mktemp("limits"), policy)
    yield server
    server.stop()


def _chat(server: Server, key: str, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def _words(n: int) -> list[dict]:
    return [{"role": "user", "content": " ".join(["word"] * n)}]


# --- context-window fallbacks -------------------------------------------------------------------------


def test_a_prompt_that_fits_stays_on_its_model(limits_proxy, mock):
    r = _chat(limits_proxy, TEAM_KEYS["alpha"], model="short", messages=_words(5))
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-proxy-model"] == "short"
    assert mock.stats()["last_bodies"][-1]["model"] == "mock-short"


@pytest.mark.parametrize(("words", "answered_by"), [(100, "medium"), (1000, "long")])
def test_a_prompt_too_long_for_the_model_goes_to_the_first_fallback_whose_window_fits(
    limits_proxy, mock, words, answered_by
):
    before = team_spend(limits_proxy, "alpha")["by_model"].get(answered_by, {}).get("input_tokens", 0)
    r = _chat(limits_proxy, TEAM_KEYS["alpha"], model="short", messages=_words(words))
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-proxy-model"] == answered_by
    assert "context-window-fallback" in r.headers["x-llm-proxy-policies"]
    assert mock.stats()["last_bodies"][-1]["model"] == f"mock-{answered_by}"
    assert mock.calls() == 1
    after = team_spend(limits_proxy, "alpha")["by_model"][answered_by]["input_tokens"]
    assert after - before == r.json()["usage"]["prompt_tokens"]


def test_a_prompt_too_long_for_every_fallback_is_a_400_with_no_call(limits_proxy, mock):
    spent = team_spend(limits_proxy, "alpha")["spend_usd"]
    r = _chat(limits_proxy, TEAM_KEYS["alpha"], model="short", messages=_words(3000))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "40 tokens (2000 with its context-window fallbacks)" in r.json()["error"]["message"]
    assert mock.calls() == 0
    assert team_spend(limits_proxy, "alpha")["spend_usd"] == spent


def test_a_context_window_fallback_the_team_may_not_use_is_skipped(limits_proxy, mock):
    # Team rich may use short but neither of its fallbacks: the prompt is too long, with no call and no spend.
    spent = team_spend(limits_proxy, "rich")["spend_usd"]
    r = _chat(limits_proxy, RICH_KEY, model="short", messages=_words(100))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 40 tokens. However" in r.json()["error"]["message"]
    assert mock.calls() == 0
    assert team_spend(limits_proxy, "rich")["spend_usd"] == spent


def test_a_fallback_the_team_may_not_use_is_skipped(limits_proxy, mock):
    mock.fault(status=502, count=20, model="mock-brittle")
    # Alpha may use every model: brittle fails, its fallback answers.
    r = _chat(limits_proxy, TEAM_KEYS["alpha"], model="brittle")
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-proxy-model"] == "long"
    # Rich may use brittle but not long: the failure is the answer, and long is never called.
    spent, calls = team_spend(limits_proxy, "rich")["spend_usd"], mock.calls()
    r = _chat(limits_proxy, RICH_KEY, model="brittle")
    assert r.status_code == 502, r.text
    sent = [b["model"] for b in mock.stats()["last_bodies"]][-(mock.calls() - calls) :]
    assert sent and set(sent) == {"mock-brittle"}, sent
    assert team_spend(limits_proxy, "rich")["spend_usd"] == spent


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_policy_text(textwrap.dedent(text), "p.yaml", {})
    return [str(i) for i in e.value.issues]


def test_check_validates_context_window_fallbacks():
    issues = _issues(
        """\
        models:
          a:
            max_input_tokens: 1000
            context_window_fallbacks: [zzz, b, c, a, e]
          b: {max_input_tokens: 500}
          c: {}
          e: {mode: embedding, max_input_tokens: 8000}
          d:
            context_window_fallbacks: [b]
        """
    )
    assert "p.yaml:4: models.a.context_window_fallbacks[0]: unknown model 'zzz'" in issues
    assert (
        "p.yaml:4: models.a.context_window_fallbacks[1]: 'b' has a context window of 500 tokens, "
        "not larger than the 1000 of 'a'"
    ) in issues
    unknown = "the context window of 'c' is unknown: set models.c.max_input_tokens"
    assert f"p.yaml:4: models.a.context_window_fallbacks[2]: {unknown}" in issues
    assert "p.yaml:4: models.a.context_window_fallbacks[3]: a model cannot fall back to itself" in issues
    assert "p.yaml:4: models.a.context_window_fallbacks[4]: 'e' has mode embedding, 'a' has mode chat" in issues
    needs = "p.yaml:9: models.d.context_window_fallbacks: needs the context window of 'd'"
    assert any(i.startswith(needs) for i in issues)


def test_check_cli_reports_a_smaller_fallback_window_with_its_line(tmp_path):
    bad = tmp_path / "windows.yaml"

    def check(window: int) -> subprocess.CompletedProcess:
        bad.write_text(
            f"models:\n  a:\n    max_input_tokens: {window}\n    context_window_fallbacks: [gpt-4o]\n  gpt-4o: {{}}\n"
        )
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "check", str(bad)], capture_output=True, text=True, cwd=ROOT
        )

    ok = check(1000)
    assert ok.returncode == 0, ok.stderr  # gpt-4o's window (128k, from litellm's map) is larger
    r = check(500000)
    assert r.returncode == 1
    assert f"{bad}:4: models.a.context_window_fallbacks[0]: 'gpt-4o' has a context window of" in r.stderr


# --- output caps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("key", [TEAM_KEYS["alpha"], POOR_KEY])
def test_max_tokens_above_the_output_cap_is_a_400_before_any_reservation(limits_proxy, mock, field, key):
    spend = admin_spend(limits_proxy)
    r = _chat(limits_proxy, key, model="short", **{field: 10**15})
    assert r.status_code == 400, r.text  # not a 429: the budget was never asked
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "invalid_value"
    assert "at most 100 completion tokens" in err["message"]
    assert mock.calls() == 0
    assert admin_spend(limits_proxy) == spend  # nothing spent, nothing left reserved


def test_max_tokens_at_the_cap_is_served(limits_proxy, mock):
    r = _chat(limits_proxy, TEAM_KEYS["alpha"], model="short", max_tokens=100)
    assert r.status_code == 200, r.text


# --- budget headers -----------------------------------------------------------------------------------


def _seconds_to_utc_midnight() -> float:
    t = time.gmtime()
    return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400 - time.time()


def test_a_budget_429_says_when_the_budget_resets_and_is_not_retried_by_the_sdk(limits_proxy, mock):
    def refused() -> float:
        for line in httpx.get(limits_proxy.url + "/metrics").text.splitlines():
            if line.startswith('llm_proxy_rate_limited_total{reason="budget",team="poor"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = refused()
    client = openai.OpenAI(base_url=limits_proxy.url + "/v1", api_key=POOR_KEY, max_retries=2)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=32)
    r = e.value.response
    assert e.value.code == "budget_exceeded"
    expected = _seconds_to_utc_midnight()
    assert abs(int(r.headers["retry-after"]) - expected) <= 5
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-ratelimit-limit-budget"] == "0.000010"
    assert float(r.headers["x-ratelimit-remaining-budget"]) == 0.00001
    assert r.headers["x-ratelimit-reset-budget"] == r.headers["retry-after"] + "s"
    assert "resets in" in e.value.message
    assert refused() == before + 1  # the SDK took x-should-retry: false and did not ask again
    assert mock.calls() == 0
    assert team_spend(limits_proxy, "poor")["spend_usd"] == 0


def test_a_budgeted_response_carries_the_budget_headers(limits_proxy, mock):
    raw = client_for_key(limits_proxy, RICH_KEY).chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=32
    )
    limit = float(raw.headers["x-ratelimit-limit-budget"])
    remaining = float(raw.headers["x-ratelimit-remaining-budget"])
    assert limit == 5.0 and 4.99 < remaining < 5.0  # what is left after this request's reservation
    reset = int(raw.headers["x-ratelimit-reset-budget"].removesuffix("s"))
    assert 0 < reset <= 31 * 86400
    # A team without a budget gets none.
    plain = client_for(limits_proxy).chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "hi"}]
    )
    assert "x-ratelimit-limit-budget" not in plain.headers


def client_for_key(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
