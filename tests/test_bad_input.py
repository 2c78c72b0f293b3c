"""Bad input: the right status, an OpenAI-shaped error, no upstream call, no spend recorded."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.conftest import TEAM_KEYS, team_spend

AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}
CHAT = [{"role": "user", "content": "hi"}]


def _post(proxy, body: bytes | dict, headers: dict | None = None, path: str = "/v1/chat/completions"):
    h = {"content-type": "application/json", **AUTH, **(headers or {})}
    if isinstance(body, dict):
        return httpx.post(proxy.url + path, json=body, headers=h)
    return httpx.post(proxy.url + path, content=body, headers=h)


def _assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


CASES = [
    ("invalid json", b'{"model": "big", "messages": [', 400, None, None),
    ("non-object body", b'["model", "big"]', 400, None, None),
    ("missing model", {"messages": CHAT}, 400, None, "model"),
    ("missing messages", {"model": "big"}, 400, None, "messages"),
    ("messages a string", {"model": "big", "messages": "hello"}, 400, None, "messages"),
    ("empty messages", {"model": "big", "messages": []}, 400, None, "messages"),
    ("bad role", {"model": "big", "messages": [{"role": "wizard", "content": "x"}]}, 400, None, "messages[0].role"),
    ("negative max_tokens", {"model": "big", "messages": CHAT, "max_tokens": -5}, 400, None, "max_tokens"),
    ("bool max_tokens", {"model": "big", "messages": CHAT, "max_tokens": True}, 400, None, "max_tokens"),
    ("huge n", {"model": "big", "messages": CHAT, "n": 100000}, 400, None, "n"),
    ("stream not bool", {"model": "big", "messages": CHAT, "stream": "yes"}, 400, None, "stream"),
    ("unknown model", {"model": "gpt-9000", "messages": CHAT}, 404, "model_not_found", "model"),
    ("api_base in body", {"model": "big", "messages": CHAT, "api_base": "http://evil"}, 400, "forbidden_field", None),
    ("api_key in body", {"model": "big", "messages": CHAT, "api_key": "sk-x"}, 400, "forbidden_field", "api_key"),
    ("base_url in body", {"model": "big", "messages": CHAT, "base_url": "http://x"}, 400, "forbidden_field", None),
    ("provider in body", {"model": "big", "messages": CHAT, "custom_llm_provider": "x"}, 400, "forbidden_field", None),
    ("extra_headers", {"model": "big", "messages": CHAT, "extra_headers": {"a": "b"}}, 400, "forbidden_field", None),
    (
        "over-long prompt",
        {"model": "big", "messages": [{"role": "user", "content": "word " * 3000}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("embedding model on chat", {"model": "embed", "messages": CHAT}, 400, "wrong_endpoint", "model"),
]


@pytest.mark.parametrize(("name", "body", "status", "code", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_rejected_before_any_upstream_call(proxy, mock, name, body, status, code, param):
    spent = team_spend(proxy, "alpha")["spend_usd"]
    r = _post(proxy, body)
    _assert_openai_error(r, status, code, param)
    assert mock.calls() == 0
    assert team_spend(proxy, "alpha")["spend_usd"] == spent


def test_completions_and_embeddings_validate_their_inputs(proxy, mock):
    _assert_openai_error(_post(proxy, {"model": "small"}, path="/v1/completions"), 400, param="prompt")
    _assert_openai_error(_post(proxy, {"model": "small", "prompt": [1, "a"]}, path="/v1/completions"), 400)
    _assert_openai_error(_post(proxy, {"model": "embed", "input": []}, path="/v1/embeddings"), 400, param="input")
    _assert_openai_error(_post(proxy, {"model": "embed", "input": "x", "stream": True}, path="/v1/embeddings"), 400)
    assert mock.stats()["calls"] == {}


def test_missing_and_invalid_keys_get_401(proxy, mock):
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "big", "messages": CHAT})
    _assert_openai_error(r, 401, "missing_api_key")
    r = _post(proxy, {"model": "big", "messages": CHAT}, {"Authorization": "Bearer sk-nope"})
    _assert_openai_error(r, 401, "invalid_api_key")
    r = _post(proxy, {"model": "big", "messages": CHAT}, {"Authorization": "Basic abc"})
    _assert_openai_error(r, 401)
    assert mock.calls() == 0


def test_model_outside_the_teams_allowlist_gets_403(proxy, mock):
    r = _post(proxy, {"model": "big", "messages": CHAT}, {"Authorization": f"Bearer {TEAM_KEYS['beta']}"})
    _assert_openai_error(r, 403, "model_not_allowed", "model")
    assert mock.calls() == 0


def test_oversized_body_gets_413(proxy, mock):
    big = {"model": "big", "messages": [{"role": "user", "content": "x" * 70000}]}
    _assert_openai_error(_post(proxy, big), 413, "request_too_large")
    assert mock.calls() == 0


def test_oversized_chunked_body_without_content_length_gets_413(proxy, mock):
    def chunks():
        yield b'{"model": "big", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(
        proxy.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json", **AUTH}
    )
    _assert_openai_error(r, 413)


def test_unsupported_content_type_gets_415(proxy, mock):
    r = _post(proxy, b"model=big", {"content-type": "application/x-www-form-urlencoded"})
    _assert_openai_error(r, 415, "unsupported_media_type")


def test_explain_refuses_what_the_endpoints_refuse(proxy, mock):
    headers = {"content-type": "text/plain", **AUTH}
    r = httpx.post(proxy.url + "/v1/proxy/explain", content=b"model=big", headers=headers)
    _assert_openai_error(r, 415, "unsupported_media_type")


def test_wrong_method_gets_405(proxy):
    _assert_openai_error(httpx.get(proxy.url + "/v1/chat/completions", headers=AUTH), 405)


def test_unknown_path_gets_openai_shaped_404(proxy):
    _assert_openai_error(httpx.get(proxy.url + "/v1/nothing", headers=AUTH), 404)


@pytest.mark.parametrize("kind", ["malformed", "html"])
def test_upstream_garbage_gets_502_and_no_spend(proxy, mock, kind):
    spent = team_spend(proxy, "alpha")["spend_usd"]
    status = 200 if kind == "malformed" else 500
    mock.fault(status=status, body=kind, count=5)
    r = _post(proxy, {"model": "big", "messages": CHAT})
    err = _assert_openai_error(r, 502, "bad_upstream_response")
    assert "upstream" in err["message"].lower()
    assert team_spend(proxy, "alpha")["spend_usd"] == spent


def test_upstream_client_error_is_relayed_not_retried(proxy, mock):
    mock.fault(status=400, count=3)
    r = _post(proxy, {"model": "big", "messages": CHAT})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "injected fault 400"
    assert mock.calls() == 1


def test_proxy_survives_a_client_that_hangs_up_mid_request(proxy, mock):
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
            b"Authorization: Bearer " + TEAM_KEYS["alpha"].encode() + b'\r\n\r\n{"model"'
        )
    r = _post(proxy, {"model": "small", "messages": CHAT})
    assert r.status_code == 200
