"""Relaying SSE: the events one upstream read completes go to the client in one write, and a usage
chunk the client did not ask for is cut out of such a run without touching its neighbours."""

from __future__ import annotations

import orjson

from proxy.services.tokens import counter_for
from proxy.wire.sse import StreamAccount


def _event(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


CONTENT = _event({"choices": [{"index": 0, "delta": {"content": "Hello there"}, "finish_reason": None}]})
FINISH = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
DONE = b"data: [DONE]\n\n"


def test_a_usage_chunk_the_client_did_not_ask_for_is_cut_from_a_run_of_events():
    account = StreamAccount(client_wants_usage=False)
    relayed = account.relay(CONTENT + FINISH + USAGE + DONE)
    assert relayed == CONTENT + FINISH + DONE
    assert account.usage == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert account.relayed == [CONTENT + FINISH + DONE]


def test_a_run_is_relayed_whole_when_the_client_asked_for_usage():
    account = StreamAccount(client_wants_usage=True)
    assert account.relay(CONTENT + USAGE + DONE) == CONTENT + USAGE + DONE
    assert account.usage["completion_tokens"] == 2


def test_a_run_that_is_only_an_unwanted_usage_chunk_relays_nothing():
    account = StreamAccount(client_wants_usage=False)
    assert account.relay(CONTENT) == CONTENT
    assert account.relay(USAGE) == b""
    assert account.relayed == [CONTENT]


def test_output_tokens_are_counted_across_runs_when_no_usage_came():
    account = StreamAccount(client_wants_usage=False)
    account.relay(CONTENT + FINISH)
    account.relay(DONE)
    assert account.usage is None
    assert account.counted_output_tokens(counter_for("gpt-4o")) == 2  # "Hello there"
