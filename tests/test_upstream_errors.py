"""An upstream's 4xx is about the request: relayed with its status and the server's own explanation, its
body wrapped into the OpenAI error shape when the server speaks another (infinity's and TEI's FastAPI
`{"detail": [...]}`), never turned into a 502; not retried, nothing spent."""

from __future__ import annotations

import httpx
import openai
import pytest

from proxy.upstream.openai_compat import MAX_UPSTREAM_MESSAGE, upstream_error_message
from tests.conftest import TEAM_KEYS, client_for, team_spend

AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}


def test_a_fastapi_422_from_an_embedding_server_reaches_the_sdk_with_its_status_and_message(proxy, mock):
    spent = team_spend(proxy, "alpha")["spend_usd"]
    mock.fault(status=422, body="detail", path="/v1/embeddings", count=3)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client_for(proxy).embeddings.create(model="embed", input=[[1, 2, 3]])
    assert e.value.status_code == 422
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] == "The upstream answered HTTP 422: body.input.str: Input should be a valid string"
    assert "[1, 2, 3]" not in err["message"]  # the detail's echo of the input is left out
    assert mock.calls("/v1/embeddings") == 1  # a 4xx is not retried
    assert team_spend(proxy, "alpha")["spend_usd"] == spent


@pytest.mark.parametrize("stream", [False, True])
def test_an_html_4xx_page_is_relayed_with_its_status_as_an_openai_error(proxy, mock, stream):
    spent = team_spend(proxy, "alpha")["spend_usd"]
    mock.fault(status=404, body="html", count=3)
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["message"] == "The upstream answered HTTP 404: 502 Bad Gateway"
    assert err["type"] == "invalid_request_error"
    assert mock.calls() == 1
    assert team_spend(proxy, "alpha")["spend_usd"] == spent


def test_an_openai_shaped_4xx_is_still_relayed_byte_for_byte(proxy, mock):
    mock.fault(status=400, count=1)
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "big", "messages": [{"role": "user", "content": "hi"}]},
        headers=AUTH,
    )
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "injected fault 400", "type": "server_error", "param": None, "code": None}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"detail": "Model not found"}', "Model not found"),
        (b'{"message": "bad\\r\\ninput\\u0000here"}', "bad input here"),
        (b'{"error": "rate card missing"}', "rate card missing"),
        (b"plain\ttext\n", "plain text"),
        (b"", "(no explanation)"),
        (b'{"detail": [{"loc": ["body", 0], "msg": "too long", "input": "secret"}, "x"]}', "body.0: too long; x"),
    ],
)
def test_upstream_error_message_keeps_the_explanation_on_one_bounded_line(body, message):
    assert upstream_error_message(body) == message


def test_upstream_error_message_is_bounded():
    text = upstream_error_message(b'{"detail": "' + b"x" * 50_000 + b'"}')
    assert len(text) == MAX_UPSTREAM_MESSAGE and text.endswith("…")
