"""Security through real servers: clients cannot steer the upstream (body fields refused, their headers
never forwarded), admin endpoints need the master key, keys and prompt text stay out of logs, metrics,
error bodies and the store, and teams are isolated (semantic cache, spend, budgets, rate limits).

The proxies run as subprocesses on a real Redis (own key prefix), in front of the project's mock
upstream served in-process so the test can see every header the proxy sends upstream.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from proxy.wire.upstream_fields import forbidden_field
from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    Server,
    delete_redis_keys,
    free_port,
    private_redis_keys,
    start_process,
    wait_for,
)
from tests.recording_upstream import RecordingUpstream

RUN = uuid.uuid4().hex[:10]
CANARY_KEY = f"sk-canary-{RUN}-do-not-log"
CANARY_HEX = hashlib.sha256(CANARY_KEY.encode()).hexdigest()
PLAINTEXT_KEY = f"sk-legacy-{RUN}-plaintext"
PROMPT = f"PROMPT-CANARY-{RUN} what is the capital of France"
UPSTREAM_KEY = f"sk-upstream-{RUN}"
KEYS = {team: f"sk-{team}-{RUN}" for team in ("red", "blue", "payer", "saver", "busy", "calm")}
ADMIN = {"authorization": f"Bearer {MASTER_KEY}"}


def _hashed(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


_LITELLM_MODEL = """\
  claude:
    provider: anthropic
    api_base: {upstream}
    api_key: test-anthropic-key
    upstream_model: claude-3-5-haiku-20241022
    price: {{input_per_mtok: 0.8, output_per_mtok: 4}}
"""


def _policy(upstream: str, prefix: str, log_path: Path, include_prompts: bool = False, litellm: bool = True) -> str:
    """The secured policy; without `litellm` no model goes through litellm (a proxy then starts seconds faster)."""
    claude = _LITELLM_MODEL.format(upstream=upstream) if litellm else ""
    teams = "\n".join(
        f"  {team}:\n    keys: [{_hashed(key)}]" for team, key in KEYS.items() if team not in ("payer", "busy", "calm")
    )
    return f"""\
version: 1
store: {{key_prefix: {prefix}}}
log: {{requests: {log_path}, include_prompts: {str(include_prompts).lower()}}}
models:
  big:
    api_base: {upstream}/v1
    upstream_model: mock-big
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
    max_input_tokens: 2000
  common: {{api_base: {upstream}/v1, upstream_model: mock-common, price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
  keyed:
    api_base: {upstream}/v1
    upstream_model: mock-keyed
    api_key: {UPSTREAM_KEY}
    price: {{input_per_mtok: 1, output_per_mtok: 2}}
  embed: {{api_base: {upstream}/v1, upstream_model: mock-embed, mode: embedding, price: {{input_per_mtok: 0.02}}}}
{claude}teams:
  canary:
    keys: [{_hashed(CANARY_KEY)}]
    limits: {{rpm: 100000}}
    key_limits: {{rpm: 100000}}
    budget: {{usd: 100, period: day}}
  legacy:
    keys: [{PLAINTEXT_KEY}]
{teams}
  payer:
    keys: [{_hashed(KEYS["payer"])}]
    budget: {{usd: 0.0004, period: day}}
  busy:
    keys: [{_hashed(KEYS["busy"])}]
    limits: {{rpm: 2}}
  calm:
    keys: [{_hashed(KEYS["calm"])}]
    limits: {{rpm: 2}}
collections:
  private: {{kind: cache, embedder: embed}}
  public: {{kind: cache, embedder: embed, shared: true}}
policies:
  - name: private-cache
    when: {{models: [big], teams: [red, blue]}}
    retrieve: {{collection: private, cache: true, min_similarity: 0.99}}
  - name: public-cache
    when: {{models: [common], teams: [red, blue]}}
    retrieve: {{collection: public, cache: true, min_similarity: 0.99}}
"""


def _start(tmp: Path, policy: str, log_level: str | None = None) -> Server:
    port = free_port()
    config = tmp / f"policy-{port}.yaml"
    config.write_text(policy)
    args = ["serve", "--config", str(config), "--port", str(port)]
    if log_level:
        args += ["--log-level", log_level]
    return start_process(
        args, port, "/healthz", tmp, {"LLM_PROXY_MASTER_KEY": MASTER_KEY, "LLM_PROXY_REDIS_URL": REDIS_URL}
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    with private_redis_keys(f"llmpsec{RUN}") as name:  # also every other proxy's prefix here starts with it
        yield name


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, upstream: RecordingUpstream, prefix: str) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("secure")
    server = _start(tmp, _policy(upstream.url, prefix, tmp / "requests.jsonl"))
    yield server
    server.stop()


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _chat(server: Server, key: str, model: str, text: str):
    raw = _client(server, key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}]
    )
    return raw.headers, raw.parse()


# --- clients cannot steer the upstream ------------------------------------------------------------

STEERING = [
    ("api_base", "http://169.254.169.254/latest"),
    ("base_url", "http://attacker.example/v1"),
    ("api_key", "sk-attacker"),
    ("api_version", "2099-01-01"),
    ("custom_llm_provider", "openai"),
    ("litellm_params", {"api_base": "http://attacker.example"}),
    ("user_config", {"model_list": [{"model_name": "big", "litellm_params": {"api_base": "http://attacker.example"}}]}),
    ("model_list", [{"model_name": "x", "litellm_params": {"model": "openai/x", "api_base": "http://a.example"}}]),
    ("fallbacks", [{"model": "gpt-4o", "api_base": "http://attacker.example"}]),
    ("context_window_fallback_dict", {"big": "attacker"}),
    ("extra_headers", {"x-api-key": "sk-attacker"}),
    ("headers", {"authorization": "Bearer sk-attacker"}),
    ("deployment_id", "attacker"),
    ("organization", "org-attacker"),
    ("azure_ad_token", "eyJ"),
    ("aws_access_key_id", "AKIA"),
    ("aws_bedrock_runtime_endpoint", "http://attacker.example"),
    ("vertex_credentials", "{}"),
    ("anthropic_identity_token_file", "/etc/passwd"),
    ("langfuse_host", "http://attacker.example"),
    ("langsmith_base_url", "http://attacker.example"),
    ("litellm_metadata", {"model_group": "x"}),
    ("mock_response", "free answer"),
    ("callbacks", ["langfuse"]),
    ("num_retries", 50),
    ("timeout", 100000),
    ("client", "x"),
    ("tags", ["free-tier"]),
    ("_litellm_internal", True),
]


@pytest.mark.parametrize(("field", "value"), STEERING, ids=[f for f, _ in STEERING])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "big", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "big", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "embed", "input": "hi"}),
    ],
    ids=["chat", "completions", "embeddings"],
)
def test_every_upstream_steering_field_is_refused(secure, upstream, path, body, field, value):
    calls = upstream.calls()
    r = httpx.post(secure.url + path, json={**body, field: value}, headers={"authorization": f"Bearer {CANARY_KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == ("forbidden_field", field, "invalid_request_error")
    assert upstream.calls() == calls


def test_the_sdk_extra_body_cannot_steer_either(secure, upstream):
    client = _client(secure, CANARY_KEY)
    calls = upstream.calls()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="big", messages=[{"role": "user", "content": "hi"}], extra_body={"api_base": "http://a.example"}
        )
    assert e.value.code == "forbidden_field"
    assert upstream.calls() == calls


def test_the_refused_names_cover_every_steering_parameter_of_the_installed_litellm(monkeypatch):
    """litellm takes a body's fields as keyword arguments: every name it reads as an endpoint, a
    credential, a header, a route or a logging destination must be refused (an upgrade that adds one
    fails here)."""
    import inspect

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-map download at import

    import litellm
    from litellm.types import utils as lt

    openai_fields = {"model", "messages", "prompt", "input", "timeout", "stream", "user", "n", "functions"}
    steering = set(lt.API_KEY_UPSTREAM_PARAMS) | set(lt.server_owned_wif_litellm_params)
    steering |= set(lt.secret_bearing_wif_litellm_params) | set(lt.StandardCallbackDynamicParams.__annotations__)
    for fn in (litellm.completion, litellm.embedding, litellm.text_completion):
        params = inspect.signature(fn).parameters
        steering |= {
            p for p in params if p in ("base_url", "api_base", "api_key", "api_version", "api_type", "model_list")
        }
        steering |= {p for p in params if p in ("deployment_id", "extra_headers", "custom_llm_provider")}
    steering |= {
        n
        for n in lt.OWNED_KWARG_NAMES
        if any(w in n for w in ("api_", "url", "key", "secret", "token", "auth", "header", "endpoint", "credential"))
        or any(w in n for w in ("fallback", "router", "retries", "retry", "routing", "model_list", "callback"))
    }
    # Prompt-template markers for self-hosted models: not steering (the litellm adapter drops them).
    steering -= openai_fields | {"bos_token", "eos_token"}
    missed = sorted(n for n in steering if forbidden_field({n: 1}) is None)
    assert not missed, f"litellm parameters a client could set: {missed}"
    # OpenAI's own request fields stay allowed.
    for name in ("temperature", "max_tokens", "metadata", "store", "user", "seed", "tools", "response_format"):
        assert forbidden_field({name: 1}) is None, name


def test_the_litellm_adapter_never_passes_litellm_arguments_from_a_body(monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from litellm.types.utils import OWNED_KWARG_NAMES

    from proxy.config.models import ModelConfig
    from proxy.upstream.litellm_adapter import LiteLLMUpstream

    adapter = LiteLLMUpstream("claude", ModelConfig(provider="anthropic", api_key="k", upstream_model="claude-x"))
    body = {"model": "claude", "messages": [], "temperature": 0.1, **dict.fromkeys(OWNED_KWARG_NAMES, "client")}
    assert set(adapter.client_fields(body)) == {"model", "messages", "temperature"}


def test_client_headers_never_reach_the_upstream(secure, upstream):
    odd = {
        "x-api-key": "sk-attacker-header",
        "api-key": "sk-attacker-header",
        "openai-organization": "org-attacker",
        "openai-project": "proj-attacker",
        "anthropic-version": "attacker",
        "x-forwarded-host": "attacker.example",
        "cookie": "session=attacker",
    }
    upstream.headers.clear()
    for model in ("big", "keyed", "claude"):
        r = httpx.post(
            secure.url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers={**odd, "authorization": f"Bearer {CANARY_KEY}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    seen = upstream.headers
    assert len(seen) == 3
    for headers in seen:
        values = " ".join(headers.values())
        assert "attacker" not in values and CANARY_KEY not in values, headers
        assert "cookie" not in headers and "openai-organization" not in headers
    big, keyed, claude = seen
    assert "authorization" not in big  # no key configured: none sent
    assert keyed["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert claude["x-api-key"] == "test-anthropic-key"


# --- admin endpoints ------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/admin/reload"),
    ("GET", "/admin/config"),
    ("GET", "/admin/spend"),
    ("GET", "/admin/savings"),
    ("GET", "/admin/kb"),
    ("GET", "/admin/kb/private"),
    ("POST", "/admin/kb/private"),
    ("DELETE", "/admin/kb/private/some-id"),
]
NOT_ADMIN = {
    "none": {},
    "wrong": {"authorization": "Bearer sk-master-wrong"},
    "prefix": {"authorization": f"Bearer {MASTER_KEY[:-1]}"},
    "longer": {"authorization": f"Bearer {MASTER_KEY}x"},
    "team key": {"authorization": f"Bearer {CANARY_KEY}"},
    "basic": {"authorization": f"Basic {MASTER_KEY}"},
}


@pytest.mark.parametrize("who", sorted(NOT_ADMIN))
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_endpoints_refuse_without_the_master_key(secure, method, path, who):
    entries = {"entries": [{"id": "x", "question": "q?", "answer": "a"}]}
    r = httpx.request(method, secure.url + path, headers=NOT_ADMIN[who], json=entries, params={"days": "1"})
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and MASTER_KEY not in r.text
    assert httpx.get(secure.url + "/admin/kb/private", headers=ADMIN).json()["total"] == 0


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/admin/spend", {"days": "abc"}),  # FastAPI would answer 422/400 before the handler
        ("GET", "/admin/savings", {"days": "-"}),
        ("POST", "/admin/kb/", {}),  # Starlette would redirect the trailing slash (307)
        ("GET", "/admin/no-such-route", {}),  # nor tell an anonymous caller which admin routes exist
    ],
)
def test_admin_refuses_before_looking_at_the_request(secure, method, path, params):
    r = httpx.request(method, secure.url + path, params=params, follow_redirects=False)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_admin_endpoints_are_off_without_a_master_key(tmp_path, upstream, prefix):
    policy = _policy(upstream.url, prefix + "off", tmp_path / "requests.jsonl", litellm=False)
    port = free_port()
    (tmp_path / "p.yaml").write_text(policy)
    server = start_process(
        ["serve", "--config", str(tmp_path / "p.yaml"), "--port", str(port), "--log-level", "warning"],
        port,
        "/healthz",
        tmp_path,
        {"LLM_PROXY_MASTER_KEY": "", "LLM_PROXY_REDIS_URL": REDIS_URL},
    )
    try:
        for method, path in ADMIN_ROUTES:
            for headers in ({}, ADMIN):
                r = httpx.request(method, server.url + path, headers=headers)
                assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", (path, r.text)
    finally:
        server.stop()


def test_admin_config_redacts_every_secret(secure):
    text = httpx.get(secure.url + "/admin/config", headers=ADMIN).text
    for secret in (CANARY_KEY, CANARY_HEX, PLAINTEXT_KEY, UPSTREAM_KEY, "test-anthropic-key", *KEYS.values()):
        assert secret not in text


# --- keys and prompt text stay out of logs, metrics, error bodies and the store -------------------


def _traffic(server: Server, upstream: RecordingUpstream) -> list[httpx.Response]:
    """Every kind of request with the canary key and prompt; returns every response."""
    auth = {"authorization": f"Bearer {CANARY_KEY}"}
    chat = {"model": "big", "messages": [{"role": "user", "content": PROMPT}]}
    out = []
    upstream.reset()  # no faults left over from another test

    def post(path: str, body=None, headers=None, content=None):
        r = httpx.post(server.url + path, json=body, content=content, headers=headers or auth, timeout=60)
        out.append(r)
        return r

    assert post("/v1/chat/completions", chat).status_code == 200
    assert post("/v1/chat/completions", {**chat, "stream": True}).status_code == 200
    assert post("/v1/chat/completions", {**chat, "model": "keyed"}).status_code == 200
    assert post("/v1/chat/completions", {**chat, "model": "claude"}).status_code == 200
    assert post("/v1/completions", {"model": "big", "prompt": PROMPT}).status_code == 200
    assert post("/v1/embeddings", {"model": "embed", "input": PROMPT}).status_code == 200
    assert post("/v1/proxy/explain", chat).status_code == 200
    # Refusals: bad keys (one that looks like the real one), bad bodies, forbidden fields, too long.
    assert post("/v1/chat/completions", chat, {"authorization": f"Bearer {CANARY_KEY}x"}).status_code == 401
    assert post("/v1/chat/completions", chat, {"api-key": CANARY_KEY[:-1]}).status_code == 401
    assert post("/admin/spend", None, auth).status_code in (401, 405)
    assert post("/v1/chat/completions", {**chat, "api_key": CANARY_KEY}).status_code == 400
    assert post("/v1/chat/completions", {**chat, "max_tokens": PROMPT}).status_code == 400
    assert post("/v1/chat/completions", {**chat, "model": "no-such-model"}).status_code == 404
    assert post("/v1/chat/completions", content=('{"model": "big", "messages": "' + PROMPT).encode()).status_code == 400
    long = {"model": "big", "messages": [{"role": "user", "content": PROMPT * 20000}]}
    assert post("/v1/chat/completions", long).status_code in (400, 413)
    # Upstream failures, relayed or reported.
    upstream_fault(upstream, status=400, count=1)
    assert post("/v1/chat/completions", chat).status_code == 400
    upstream_fault(upstream, status=500, count=10, body="html")
    assert post("/v1/chat/completions", chat).status_code >= 500
    upstream.reset()
    return out


def upstream_fault(upstream: RecordingUpstream, **fault) -> None:
    httpx.post(upstream.url + "/mock/faults", json=fault).raise_for_status()


def _store_dump(prefix: str) -> str:
    client = redis.Redis.from_url(REDIS_URL)
    parts = []
    try:
        for key in client.scan_iter(f"{prefix}*", count=1000):
            parts.append(key.decode("latin-1"))
            kind = client.type(key)
            if kind == b"hash":
                parts += [f"{k!r}={v!r}" for k, v in client.hgetall(key).items()]
            elif kind == b"string":
                parts.append(repr(client.get(key)))
            elif kind == b"zset":
                parts += [repr(m) for m in client.zrange(key, 0, -1)]
            elif kind == b"set":
                parts += [repr(m) for m in client.smembers(key)]
            elif kind == b"list":
                parts += [repr(m) for m in client.lrange(key, 0, -1)]
    finally:
        client.close()
    return "\n".join(parts)


@pytest.mark.parametrize("log_level", [None, "debug"], ids=["default-level", "debug"])
def test_keys_and_prompts_never_reach_logs_metrics_error_bodies_or_the_store(tmp_path, upstream, log_level):
    prefix = f"llmpsec{RUN}{log_level or 'default'}"
    request_log = tmp_path / "requests.jsonl"
    server = _start(tmp_path, _policy(upstream.url, prefix, request_log), log_level)
    try:
        responses = _traffic(server, upstream)
        # The request log is written in the background; the last request (an upstream failure) ends it.
        wait_for(lambda: request_log.exists() and '"status":50' in request_log.read_text(), "the request log")
        metrics = httpx.get(server.url + "/metrics").text
        store = _store_dump(prefix)
    finally:
        server.stop()
        delete_redis_keys(prefix)
    logs = server.log()
    if log_level == "debug":
        assert "DEBUG" in logs  # the debug level really was on
    answers = "\n".join(f"{r.status_code} {dict(r.headers)} {r.text}" for r in responses)
    errors = "\n".join(r.text for r in responses if r.status_code >= 400)
    places = {"logs": logs, "request log": request_log.read_text(), "metrics": metrics, "responses": answers}
    fingerprint = CANARY_HEX[:12]  # the documented key fingerprint: names per-key counters in the store
    for where, text in {**places, "store": store}.items():
        assert CANARY_KEY not in text and CANARY_KEY[:-1] not in text, where
        assert CANARY_HEX[:13] not in text, f"more of the key's hash than its fingerprint in the {where}"
        assert PLAINTEXT_KEY not in text and UPSTREAM_KEY not in text, where
    for where, text in places.items():
        assert fingerprint not in text, f"the key fingerprint in the {where}"
    for where, text in {"logs": logs, "request log": request_log.read_text(), "metrics": metrics}.items():
        assert "PROMPT-CANARY" not in text, f"prompt text in the {where}"
    assert "PROMPT-CANARY" not in errors
    assert "plaintext" in logs  # the warning about the plaintext key names the problem, not the key
    assert f"key:{fingerprint}" in store  # per-key counters exist, under the fingerprint only


def test_prompts_reach_the_request_log_only_when_the_policy_opts_in(tmp_path, upstream):
    prefix = f"llmpsec{RUN}prompts"
    request_log = tmp_path / "requests.jsonl"
    server = _start(tmp_path, _policy(upstream.url, prefix, request_log, include_prompts=True, litellm=False))
    try:
        _chat(server, CANARY_KEY, "big", PROMPT)
        wait_for(lambda: request_log.exists() and request_log.read_text(), "the request log")
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
        delete_redis_keys(prefix)
    assert PROMPT in request_log.read_text()
    assert CANARY_KEY not in request_log.read_text()
    assert "PROMPT-CANARY" not in server.log() and "PROMPT-CANARY" not in metrics


def test_virtual_keys_are_held_hashed(secure):
    from proxy.config import load_policy_file
    from proxy.services.keyring import KeyRing

    policy_file = next(Path(secure.log_path.parent).glob(f"policy-{secure.port}.yaml"))
    ring = KeyRing(load_policy_file(str(policy_file)).teams)
    held = repr(vars(ring))
    assert CANARY_KEY not in held and PLAINTEXT_KEY not in held  # a plaintext key in the file is hashed at load
    assert _hashed(PLAINTEXT_KEY) in held and ring.team_for(PLAINTEXT_KEY) is not None
    assert ring.team_for(CANARY_KEY)[0] == "canary"


# --- teams are isolated ---------------------------------------------------------------------------


def test_one_teams_cache_never_answers_another_unless_the_collection_is_shared(secure, upstream):
    private = f"What is the tallest mountain in Europe? ({RUN})"
    headers, _ = _chat(secure, KEYS["red"], "big", private)
    assert headers["x-llm-proxy-route"] == "upstream"
    wait_for(lambda: _chat(secure, KEYS["red"], "big", private)[0]["x-llm-proxy-route"] == "retrieval", "red's fill")
    calls = upstream.calls()
    # Blue's first ask goes upstream (red's entry is not blue's); its answer then fills blue's own entry.
    assert _chat(secure, KEYS["blue"], "big", private)[0]["x-llm-proxy-route"] == "upstream"
    assert upstream.calls() > calls
    owners = lambda: sorted(  # noqa: E731
        tuple(e["teams"])
        for e in httpx.get(secure.url + "/admin/kb/private?limit=1000", headers=ADMIN).json()["entries"]
        if e["questions"] == [private]
    )
    assert wait_for(lambda: len(owners()) == 2 and owners(), "blue's own entry") == [("blue",), ("red",)]
    public = f"What is the longest river in Africa? ({RUN})"
    assert _chat(secure, KEYS["red"], "common", public)[0]["x-llm-proxy-route"] == "upstream"
    wait_for(lambda: _chat(secure, KEYS["blue"], "common", public)[0]["x-llm-proxy-route"] == "retrieval", "sharing")


def _team(server: Server, team: str) -> dict:
    return httpx.get(server.url + "/admin/spend", headers=ADMIN).json()["teams"].get(team, {})


def test_spend_and_budgets_of_teams_are_independent(secure):
    saver = _team(secure, "saver")
    client = _client(secure, KEYS["payer"])
    refused = 0
    for _ in range(20):  # the payer's small budget runs out after a few requests
        try:
            client.chat.completions.create(model="big", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError as e:
            assert e.code == "budget_exceeded"
            refused += 1
            break
    assert refused == 1
    assert _team(secure, "payer")["spend_usd"] > 0
    assert _team(secure, "saver") == saver  # untouched by the payer's spend
    headers, _ = _chat(secure, KEYS["saver"], "big", "hi")  # and not refused: its own budget
    assert float(headers["x-llm-proxy-cost-usd"]) > 0
    wait_for(lambda: _team(secure, "saver")["spend_usd"] > saver.get("spend_usd", 0), "saver's spend")
    assert _team(secure, "payer")["budget"]["remaining_usd"] < _team(secure, "payer")["budget"]["limit_usd"]


def test_one_teams_rate_limit_does_not_consume_anothers(secure):
    busy, calm = _client(secure, KEYS["busy"]), _client(secure, KEYS["calm"])
    hello = {"model": "big", "messages": [{"role": "user", "content": "hi"}]}
    busy.chat.completions.create(**hello)
    busy.chat.completions.create(**hello)
    with pytest.raises(openai.RateLimitError) as e:
        busy.chat.completions.create(**hello)
    assert e.value.code == "rate_limit_exceeded"
    for _ in range(2):  # calm's two requests a minute are all its own
        raw = calm.chat.completions.with_raw_response.create(**hello)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError):
        calm.chat.completions.create(**hello)
