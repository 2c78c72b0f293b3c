"""Values that reach a response header are validated where they enter (a model name, a knowledge-base
entry's source), and the header writer itself drops a value an HTTP server would refuse, so no copied
text can cost a client its response."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import MASTER_KEY, TEAM_KEYS, MockUpstream, Server, policy_yaml, start_proxy, team_spend, wait_for

AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
CHAT = [{"role": "user", "content": "hi"}]

KB = """
collections:
  docs: {kind: kb, embedder: embed}
policies:
  - name: docs
    when: {models: [big]}
    retrieve: {collection: docs, min_similarity: -1, min_margin: 0, decisive_tokens: false}
"""


@pytest.mark.parametrize("model", ["gpt-4o\n", "big\n", "big\r\nx-evil: 1", "big\x00", "b\x7fig", "m" * 300])
@pytest.mark.parametrize("stream", [False, True])
def test_a_model_name_with_control_characters_is_a_400_not_a_dropped_connection(proxy, mock, model, stream):
    spent = team_spend(proxy, "alpha")["spend_usd"]
    r = httpx.post(
        proxy.url + "/v1/chat/completions", json={"model": model, "messages": CHAT, "stream": stream}, headers=AUTH
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "invalid_model"
    assert "x-llm-proxy-request-id" in r.headers
    assert mock.stats()["calls"] == {}
    assert team_spend(proxy, "alpha")["spend_usd"] == spent


def test_a_model_name_with_control_characters_is_refused_by_check():
    from proxy.config import ConfigError, parse_policy_text

    with pytest.raises(ConfigError) as e:
        parse_policy_text('models:\n  "bad\\nname": {}\n', "p.yaml", {})
    assert any("control characters" in str(i) for i in e.value.issues)


@pytest.fixture(scope="module")
def kb_proxy(tmp_path_factory: pytest.TempPathFactory, mock_upstream: MockUpstream) -> Iterator[Server]:
    server = start_proxy(tmp_path_factory.mktemp("kbheaders"), policy_yaml(mock_upstream.url, KB))
    wait_for(lambda: httpx.get(server.url + "/readyz").json()["collections"]["docs"]["ready"], "the collection")
    yield server
    server.stop()


def _stored(server: Server) -> int:
    r = httpx.get(server.url + "/admin/kb/docs", headers=ADMIN)
    r.raise_for_status()
    return r.json()["total"]


@pytest.mark.parametrize("field", ["source", "tags"])
@pytest.mark.parametrize("bad", ["docs/a\r\nx-evil: 1", "line\nbreak", "nul\x00"])
def test_an_entry_with_control_characters_in_a_header_bound_field_is_refused_and_nothing_is_stored(
    kb_proxy, mock, field, bad
):
    good = {"id": "ok", "question": "How do I reset my password?", "answer": "Use the link.", "source": "docs/reset"}
    entry = {"id": "bad", "question": "What is X?", "answer": "X.", field: bad if field == "source" else [bad]}
    r = httpx.post(kb_proxy.url + "/admin/kb/docs", json={"entries": [good, entry]}, headers=ADMIN)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_entries" and "control character" in err["message"]
    assert _stored(kb_proxy) == 0
    assert mock.calls("/v1/embeddings") == 0  # refused before anything was embedded


def test_an_entry_source_reaches_its_header_intact(kb_proxy, mock):
    entry = {"id": "reset", "question": "How do I reset my password?", "answer": "Use the link.", "source": "docs/ü"}
    r = httpx.post(kb_proxy.url + "/admin/kb/docs", json=[entry], headers=ADMIN)
    assert r.status_code == 200, r.text
    try:
        wait_for(lambda: httpx.get(kb_proxy.url + "/readyz").json()["collections"]["docs"]["entries"] >= 1, "entry")
        r = httpx.post(
            kb_proxy.url + "/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": "How do I reset my password?"}]},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        assert dict(r.headers.raw)[b"x-llm-proxy-retrieval-source"] == "docs/ü".encode()
        assert mock.calls() == 0
    finally:
        httpx.delete(kb_proxy.url + "/admin/kb/docs/reset", headers=ADMIN)


def test_the_header_writer_drops_a_value_with_control_characters_and_keeps_the_rest():
    from proxy.http.asgi import JSON, safe_headers, send_json

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    headers = [(b"x-llm-proxy-model", b"gpt-4o\n"), (b"x-llm-proxy-route", b"upstream"), (b"x-a", b"tab\tok")]
    asyncio.run(send_json(send, 200, b"{}", headers))
    assert sent[0]["headers"] == [JSON, (b"x-llm-proxy-route", b"upstream"), (b"x-a", b"tab\tok")]
    assert sent[1]["body"] == b"{}"
    ok = [(b"a", b"plain"), (b"b", "ü".encode())]
    assert safe_headers(ok) is ok  # the common case costs one scan and no copy
