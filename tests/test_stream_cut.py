"""A stream the upstream cuts mid-way: the client gets the chunks relayed so far, then one OpenAI-shaped
error event, and no `[DONE]`; the prompt and the relayed tokens are billed, exactly what the mock served."""

from __future__ import annotations

import httpx
import orjson

from tests.conftest import TEAM_KEYS, team_spend, wait_for


def test_a_stream_cut_by_the_upstream_ends_with_an_error_event_and_bills_what_was_served(proxy, mock):
    mock.configure(reply_tokens=20)
    mock.fault(after_chunks=4, count=1, model="mock-small")
    before = team_spend(proxy, "alpha")["by_model"].get("small", {"input_tokens": 0, "output_tokens": 0})
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
        json={"model": "small", "messages": [{"role": "user", "content": "tell me more"}], "stream": True},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        payloads = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in payloads
    *chunks, last = [orjson.loads(p) for p in payloads]
    assert len(chunks) == 4 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    error = last["error"]
    assert error["code"] == "bad_upstream_response" and error["type"] == "upstream_error"
    assert "broke off" in error["message"]

    served = mock.stats()
    assert served["faults_applied"] == {"stream_cut": 1}

    def billed() -> tuple[int, int] | None:
        line = team_spend(proxy, "alpha")["by_model"].get("small", {})
        got = (
            line.get("input_tokens", 0) - before["input_tokens"],
            line.get("output_tokens", 0) - before["output_tokens"],
        )
        return got if got != (0, 0) else None

    assert wait_for(billed, "the cut stream to be recorded", 10) == (
        served["prompt_tokens_served"],
        served["completion_tokens_served"],
    )
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert len(text.split()) == 4 and served["completion_tokens_served"] >= 4  # four one-word chunks
