"""Micro-batching: the real proxy in front of the real reference backend (tiny random-weight Llama and
MiniLM on CPU), and the mock upstream for replies no sane backend sends.

Queues are filled deterministically: the backend (or the mock) holds the first call until the test
releases it, and the test waits until the proxy's queue-depth gauge shows every request waiting.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import openai
import orjson
import pytest
from aiohttp import web

from proxy.config import ConfigError, parse_policy_text
from proxy.config.models import ModelConfig
from proxy.errors import ExceedsModelMemory
from proxy.fakes.mock_upstream import build_mock_app
from proxy.services.tokens import counter_for
from proxy.upstream.batcher import MicroBatcher
from proxy.upstream.openai_compat import OpenAICompatUpstream
from tests.conftest import (
    ROOT,
    START_TIMEOUT_S,
    TEAM_KEYS,
    MockUpstream,
    Server,
    client_for,
    free_port,
    start_proxy,
    wait_until_serving,
)

AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}
WAIT_S = 60.0
# Serving facts that leave exactly 100 tokens in flight: 1.1 GB, no margin, 0.5B parameters at fp16 (1 GB of
# weights), 1 MB per token. Two requests of a short prompt and 45 output tokens fit together, three do not.
MEMORY_100_TOKENS = {
    "hardware": {"gpu_memory_gb": 1.1, "memory_margin": 0},
    "params_b": 0.5,
    "dtype": "fp16",
    "kv_mb_per_token": 1,
}


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)  # polling another process's state; there is no event to wait on
    raise TimeoutError(f"timed out waiting for {what}")


class Backend(Server):
    def stats(self) -> dict:
        return httpx.get(self.url + "/stats").json()

    def control(self, **kw: Any) -> dict:
        r = httpx.post(self.url + "/control", json=kw)
        r.raise_for_status()
        return r.json()

    def calls(self, path: str) -> int:
        return self.stats()["calls"].get(path, 0)


@pytest.fixture(scope="module")
def backend(session_tmp: Path) -> Iterator[Backend]:
    port = free_port()
    log_path = session_tmp / f"reference-backend-{port}.log"
    cache = session_tmp / "model-cache"
    args = ["reference-backend", "--tiny", "--test-controls", "--port", str(port), "--cache-dir", str(cache)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=dict(os.environ), stdout=log, stderr=log
        )
    server = Backend(proc, port, log_path)
    try:
        # torch + transformers imports are slow
        wait_until_serving(server.url + "/healthz", proc, timeout=max(180, START_TIMEOUT_S))
    except Exception as e:
        server.stop()
        raise RuntimeError(f"the reference backend did not start:\n{server.log()}") from e
    yield server
    server.stop()


def _policy(backend_url: str, mock_url: str) -> str:
    ref = f"api_base: {backend_url}/v1"
    mock = f"api_base: {mock_url}/v1"
    return textwrap.dedent(
        f"""\
        version: 1
        retries: {{max_attempts: 1}}
        models:
          emb:
            {ref}
            upstream_model: all-MiniLM-L6-v2
            mode: embedding
            price: {{input_per_mtok: 0.02}}
            batching: {{mode: embeddings, max_batch_size: 64, max_wait_ms: 2}}
          emb-lowload:
            {ref}
            upstream_model: all-MiniLM-L6-v2
            mode: embedding
            price: {{input_per_mtok: 0.02}}
            batching: {{mode: embeddings, max_batch_size: 64, max_wait_ms: 50}}
          comp:
            {ref}
            upstream_model: tiny-llama
            mode: completion
            price: {{input_per_mtok: 0.1, output_per_mtok: 0.1}}
            batching: {{mode: completions, max_batch_size: 64, max_wait_ms: 2}}
          comp-q:
            {ref}
            upstream_model: tiny-llama
            mode: completion
            price: {{input_per_mtok: 0.1, output_per_mtok: 0.1}}
            batching: {{mode: completions, max_queue: 2, max_wait_ms: 2}}
          chat:
            {ref}
            upstream_model: tiny-llama
            price: {{input_per_mtok: 0.1, output_per_mtok: 0.1}}
            batching: {{mode: batch_endpoint, max_wait_ms: 2}}
          comp-mem:
            {ref}
            upstream_model: tiny-llama
            mode: completion
            hardware: {{gpu_memory_gb: 1.1, memory_margin: 0}}
            params_b: 0.5
            kv_mb_per_token: 1
            price: {{input_per_mtok: 0.1, output_per_mtok: 0.1}}
            batching: {{mode: completions, max_batch_size: 64, max_wait_ms: 2}}
          m-emb:
            {mock}
            upstream_model: mock-emb
            mode: embedding
            price: {{input_per_mtok: 0.02}}
            batching: {{mode: embeddings, max_wait_ms: 2}}
          m-emb-retry:
            {mock}
            upstream_model: mock-emb-retry
            mode: embedding
            price: {{input_per_mtok: 0.02}}
            retries: {{max_attempts: 3, initial_backoff_s: 0.01, max_backoff_s: 0.05}}
            batching: {{mode: embeddings, max_wait_ms: 2}}
          m-comp:
            {mock}
            upstream_model: mock-comp
            mode: completion
            price: {{input_per_mtok: 1, output_per_mtok: 2}}
            batching: {{mode: completions, max_wait_ms: 2}}
          m-chat:
            {mock}
            upstream_model: mock-chat
            price: {{input_per_mtok: 1, output_per_mtok: 2}}
            batching: {{mode: batch_endpoint, max_wait_ms: 2}}
          m-slow:
            {mock}
            upstream_model: mock-slow
            mode: embedding
            price: {{input_per_mtok: 0.02}}
            timeout_s: 1
            batching: {{mode: embeddings, max_wait_ms: 2}}
          m-mem:
            {mock}
            upstream_model: mock-mem
            mode: completion
            hardware: {{gpu_memory_gb: 1.1, memory_margin: 0}}
            params_b: 0.5
            kv_mb_per_token: 1
            price: {{input_per_mtok: 1, output_per_mtok: 2}}
            batching: {{mode: completions, max_wait_ms: 2}}
        teams:
          alpha:
            keys: [{TEAM_KEYS["alpha"]}]
            models: ["*"]
          beta:  # a budget so small that any reservation is refused
            keys: [{TEAM_KEYS["beta"]}]
            models: ["*"]
            budget: {{usd: 0.0000001, period: none}}
        """
    )


@pytest.fixture(scope="module")
def bproxy(session_tmp: Path, backend: Backend, mock_upstream: MockUpstream) -> Iterator[Server]:
    server = start_proxy(session_tmp, _policy(backend.url, mock_upstream.url))
    yield server
    server.stop()


@pytest.fixture
def ref(backend: Backend) -> Iterator[Backend]:
    backend.control(hold=False, usage="per_item", reset=True)
    yield backend
    backend.control(hold=False, usage="per_item")


def metric(server: Server, name: str, **labels: str) -> float:
    """Sum of the series of `name` that carry all of `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if all(w in series for w in wanted):
                total += float(value)
    return total


def queue_depth(proxy: Server, model: str) -> int:
    return int(metric(proxy, "llm_proxy_batch_queue_depth", model=model))


def post(proxy: Server, path: str, body: dict, timeout: float = WAIT_S) -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, headers=AUTH, timeout=timeout)


class Burst:
    """Fill a batch queue deterministically: the upstream holds a first (blocker) request, then
    every request of the burst is sent and waits in the proxy's queue until `release()`."""

    def __init__(self, proxy: Server, model: str, hold: Callable[[], None], held: Callable[[], bool]):
        self.proxy, self.model = proxy, model
        self._hold, self._held = hold, held
        self._pool = ThreadPoolExecutor(max_workers=32)
        self.blocker: Future | None = None

    def start(self, send_blocker: Callable[[], Any]) -> None:
        self._hold()
        self.blocker = self._pool.submit(send_blocker)
        wait_for(self._held, "the upstream to hold the blocker")

    def queue(self, calls: list[Callable[[], Any]]) -> list[Future]:
        before = queue_depth(self.proxy, self.model)
        futures = [self._pool.submit(c) for c in calls]
        wait_for(lambda: queue_depth(self.proxy, self.model) == before + len(calls), "the requests to queue")
        return futures

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def reference_burst(proxy: Server, ref: Backend, model: str) -> Burst:
    return Burst(proxy, model, lambda: ref.control(hold=True), lambda: ref.stats()["held"] == 1)


def mock_burst(proxy: Server, mock: MockUpstream, model: str, upstream_model: str) -> Burst:
    return Burst(
        proxy, model, lambda: mock.fault(hold=True, count=1, model=upstream_model), lambda: mock.stats()["held"] == 1
    )


# Coalescing, and each client gets its own answer ---------------------------------------------------


def test_concurrent_embeddings_are_coalesced_and_each_client_gets_its_own_vectors(bproxy, ref):
    client = client_for(bproxy, timeout=WAIT_S)
    inputs: list[str | list[str]] = [
        f"sentence number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(10)
    ]
    inputs[3] = ["a request with two inputs", "its second input"]
    burst = reference_burst(bproxy, ref, "emb")
    try:
        burst.start(lambda: client.embeddings.create(model="emb", input="the blocker"))
        futures = burst.queue(
            [lambda x=x: client.embeddings.with_raw_response.create(model="emb", input=x) for x in inputs]
        )
        ref.control(hold=False)
        raws = [f.result(timeout=WAIT_S) for f in futures]
        burst.blocker.result(timeout=WAIT_S)
    finally:
        burst.close()
    stats = ref.stats()
    assert stats["calls"]["/embeddings"] == 2  # the blocker, then all eleven requests in one call
    assert stats["rows"] == [1, 11]
    for x, raw in zip(inputs, raws, strict=True):
        assert raw.headers["x-llm-proxy-route"] == "batch"
        reply = raw.parse()
        texts = x if isinstance(x, list) else [x]
        alone = httpx.post(ref.url + "/v1/embeddings", json={"input": texts}).json()  # unbatched, direct
        assert [d.index for d in reply.data] == list(range(len(texts)))
        for got, want in zip(reply.data, alone["data"], strict=True):
            np.testing.assert_allclose(got.embedding, want["embedding"], atol=1e-5)
        assert reply.usage.prompt_tokens == alone["usage"]["prompt_tokens"]


def _completion_burst(bproxy: Server, ref: Backend, requests: list[dict]) -> list[httpx.Response]:
    burst = reference_burst(bproxy, ref, "comp")
    try:
        burst.start(lambda: post(bproxy, "/v1/completions", {"model": "comp", "prompt": "blocker", "max_tokens": 2}))
        futures = burst.queue([lambda r=r: post(bproxy, "/v1/completions", {"model": "comp", **r}) for r in requests])
        ref.control(hold=False)
        replies = [f.result(timeout=WAIT_S) for f in futures]
        assert burst.blocker.result(timeout=WAIT_S).status_code == 200
    finally:
        burst.close()
    return replies


def test_concurrent_completions_map_each_choice_back_to_its_own_prompt(bproxy, ref):
    requests: list[dict] = [
        {"prompt": f"prompt {i}: {'x' * i}", "max_tokens": 3, "temperature": 0, "echo": True} for i in range(6)
    ]
    requests.append({"prompt": ["first of two", "second of two"], "max_tokens": 3, "temperature": 0, "echo": True})
    # Different sampling parameters never share a call: these two go together, apart from the rest.
    requests += [{"prompt": f"other {i}", "max_tokens": 4, "n": 2, "temperature": 0, "echo": True} for i in range(2)]
    replies = _completion_burst(bproxy, ref, requests)
    stats = ref.stats()
    assert stats["calls"]["/completions"] == 3
    assert sorted(stats["rows"][1:]) == [4, 8]  # 2 prompts × n=2; 6 + 2 prompts
    for req, r in zip(requests, replies, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-llm-proxy-route"] == "batch"
        reply = r.json()
        prompts = req["prompt"] if isinstance(req["prompt"], list) else [req["prompt"]]
        n = req.get("n", 1)
        assert [c["index"] for c in reply["choices"]] == list(range(len(prompts) * n))
        for c in reply["choices"]:
            assert c["text"].startswith(prompts[c["index"] // n])  # echo: the prompt this choice answers
            assert len(c["text"]) == len(prompts[c["index"] // n]) + req["max_tokens"]
        # The tiny model's tokens are bytes: usage is exact per request, from the backend's per-input usage.
        assert reply["usage"]["prompt_tokens"] == sum(len(p.encode()) for p in prompts)
        assert reply["usage"]["completion_tokens"] == req["max_tokens"] * len(prompts) * n
        assert "usage_per_input" not in reply


def test_without_per_input_usage_the_proxy_counts_each_requests_tokens(bproxy, ref):
    ref.control(usage="aggregate")
    requests = [{"prompt": f"count me {i} " * (i + 1), "max_tokens": 3, "temperature": 0} for i in range(4)]
    replies = _completion_burst(bproxy, ref, requests)
    assert ref.stats()["calls"]["/completions"] == 2
    counter = counter_for("tiny-llama")
    for req, r in zip(requests, replies, strict=True):
        usage = r.json()["usage"]
        text = r.json()["choices"][0]["text"]
        assert usage["prompt_tokens"] == counter.text(req["prompt"])
        assert usage["completion_tokens"] == counter.text(text)


def test_chat_requests_share_one_batch_endpoint_call(bproxy, ref):
    client = client_for(bproxy, timeout=WAIT_S)
    contents = [f"question {i} " + "?" * i for i in range(5)]
    burst = reference_burst(bproxy, ref, "chat")
    try:
        burst.start(lambda: client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "b"}]))
        futures = burst.queue(
            [
                lambda c=c: client.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": c}], max_tokens=2, temperature=0
                )
                for c in contents
            ]
        )
        ref.control(hold=False)
        raws = [f.result(timeout=WAIT_S) for f in futures]
        burst.blocker.result(timeout=WAIT_S)
    finally:
        burst.close()
    stats = ref.stats()
    assert stats["calls"] == {"/chat/completions": 1, "/batch/chat/completions": 1}
    assert stats["rows"] == [1, 5]
    for c, raw in zip(contents, raws, strict=True):
        assert raw.headers["x-llm-proxy-route"] == "batch"
        reply = raw.parse()
        alone = httpx.post(
            ref.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": c}], "max_tokens": 1}
        ).json()
        assert reply.usage.prompt_tokens == alone["usage"]["prompt_tokens"]  # its own prompt, not a neighbour's
        assert reply.usage.completion_tokens == 2
        assert len(reply.choices) == 1 and len(reply.choices[0].message.content) == 2


# Low load ------------------------------------------------------------------------------------------


def test_a_lone_request_is_sent_at_once(bproxy, ref):
    client = client_for(bproxy, timeout=WAIT_S)
    for i in range(2):
        raw = client.embeddings.with_raw_response.create(model="emb-lowload", input=f"alone {i}")
        assert raw.headers["x-llm-proxy-route"] == "batch"
    # Each went out as a batch of one and waited exactly zero: the 50 ms window never applied.
    assert metric(bproxy, "llm_proxy_batch_size_count", model="emb-lowload") == 2
    assert metric(bproxy, "llm_proxy_batch_size_sum", model="emb-lowload") == 2
    assert metric(bproxy, "llm_proxy_batch_queue_wait_seconds_count", model="emb-lowload") == 2
    assert metric(bproxy, "llm_proxy_batch_queue_wait_seconds_sum", model="emb-lowload") == 0.0
    assert ref.stats()["rows"] == [1, 1]


def test_streams_are_never_batched(bproxy, mock):
    client = client_for(bproxy, timeout=WAIT_S)
    with client.chat.completions.with_streaming_response.create(
        model="m-chat", messages=[{"role": "user", "content": "stream me"}], stream=True
    ) as r:
        assert r.headers["x-llm-proxy-route"] == "upstream"
        assert "".join(chunk.choices[0].delta.content or "" for chunk in r.parse() if chunk.choices)
    assert mock.stats()["calls"] == {"/v1/chat/completions": 1}


# Queue bound, failures, timeouts -------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(bproxy, ref):
    burst = reference_burst(bproxy, ref, "comp-q")
    body = {"model": "comp-q", "prompt": "queued", "max_tokens": 2}
    try:
        burst.start(lambda: post(bproxy, "/v1/completions", body))
        futures = burst.queue([lambda: post(bproxy, "/v1/completions", body)] * 2)
        r = post(bproxy, "/v1/completions", body)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "queue" in err["message"]
        assert queue_depth(bproxy, "comp-q") == 2  # the refused request left nothing behind
        ref.control(hold=False)
        assert [f.result(timeout=WAIT_S).status_code for f in futures] == [200, 200]
        assert burst.blocker.result(timeout=WAIT_S).status_code == 200
    finally:
        burst.close()
    assert ref.stats()["rows"] == [1, 2]


def test_a_bad_request_in_a_merged_call_fails_alone(bproxy, ref):
    errors = metric(bproxy, "llm_proxy_batch_item_errors_total", model="comp")
    too_long = "y" * 2100  # past the tiny model's 2048-token context: the backend refuses the whole call
    requests = [
        {"prompt": "good one", "max_tokens": 2, "echo": True},
        {"prompt": too_long, "max_tokens": 2, "echo": True},
        {"prompt": "good two", "max_tokens": 2, "echo": True},
    ]
    ok1, bad, ok2 = _completion_burst(bproxy, ref, requests)
    assert ok1.status_code == ok2.status_code == 200
    assert ok1.json()["choices"][0]["text"].startswith("good one")
    assert ok2.json()["choices"][0]["text"].startswith("good two")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "context_length_exceeded"
    assert metric(bproxy, "llm_proxy_batch_item_errors_total", model="comp") == errors + 1
    # blocker, the merged call the backend refused, then each request alone
    assert ref.stats()["calls"]["/completions"] == 5


def test_a_bad_request_in_a_batch_endpoint_call_fails_alone(bproxy, ref):
    client = client_for(bproxy, timeout=WAIT_S)
    burst = reference_burst(bproxy, ref, "chat")
    contents = ["fine", "z" * 2100, "also fine"]
    try:
        burst.start(lambda: client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "b"}]))
        futures = burst.queue(
            [
                lambda c=c: post(
                    bproxy, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": c}]}
                )
                for c in contents
            ]
        )
        ref.control(hold=False)
        ok1, bad, ok2 = (f.result(timeout=WAIT_S) for f in futures)
    finally:
        burst.close()
    assert ok1.status_code == ok2.status_code == 200
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "context_length_exceeded"
    assert ref.stats()["calls"]["/batch/chat/completions"] == 1


def _mock_embedding_burst(bproxy: Server, mock: MockUpstream, model: str, upstream: str, n: int = 3) -> list:
    burst = mock_burst(bproxy, mock, model, upstream)
    try:
        burst.start(lambda: post(bproxy, "/v1/embeddings", {"model": model, "input": "blocker"}))
        futures = burst.queue(
            [lambda i=i: post(bproxy, "/v1/embeddings", {"model": model, "input": f"q{i}"}) for i in range(n)]
        )
        return [burst, futures]
    except Exception:
        burst.close()
        raise


def test_a_whole_batch_500_gives_every_waiting_client_a_502(bproxy, mock):
    burst, futures = _mock_embedding_burst(bproxy, mock, "m-emb", "mock-emb")
    try:
        mock.fault(status=500, count=1, model="mock-emb")
        httpx.post(mock.url + "/mock/release")
        replies = [f.result(timeout=WAIT_S) for f in futures]
        assert burst.blocker.result(timeout=WAIT_S).status_code == 200
    finally:
        burst.close()
    for r in replies:
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["type"] == "upstream_error" and "batched call for 3 requests failed with HTTP 500" in err["message"]
    assert mock.stats()["calls"]["/v1/embeddings"] == 2


def test_a_transient_batch_failure_is_retried_request_by_request(bproxy, mock):
    burst, futures = _mock_embedding_burst(bproxy, mock, "m-emb-retry", "mock-emb-retry")
    try:
        mock.fault(status=503, count=1, model="mock-emb-retry")
        httpx.post(mock.url + "/mock/release")
        replies = [f.result(timeout=WAIT_S) for f in futures]
    finally:
        burst.close()
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert [r.json()["data"][0]["index"] for r in replies] == [0, 0, 0]


@pytest.mark.parametrize(
    ("model", "upstream", "path", "results"),
    [
        ("m-emb", "mock-emb", "/v1/embeddings", "fewer"),
        ("m-emb", "mock-emb", "/v1/embeddings", "duplicate_index"),
        ("m-comp", "mock-comp", "/v1/completions", "fewer"),
        ("m-comp", "mock-comp", "/v1/completions", "duplicate_index"),
        ("m-chat", "mock-chat", "/v1/chat/completions", "fewer"),
    ],
)
def test_a_batched_reply_that_does_not_fit_gives_each_client_a_502(bproxy, mock, model, upstream, path, results):
    def body(i: int) -> dict:
        if path == "/v1/embeddings":
            return {"model": model, "input": f"q{i}"}
        if path == "/v1/completions":
            return {"model": model, "prompt": f"q{i}"}
        return {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}

    burst = mock_burst(bproxy, mock, model, upstream)
    try:
        burst.start(lambda: post(bproxy, path, body(99)))
        futures = burst.queue([lambda i=i: post(bproxy, path, body(i)) for i in range(3)])
        mock.fault(results=results, count=1, model=upstream)
        httpx.post(mock.url + "/mock/release")
        replies = [f.result(timeout=WAIT_S) for f in futures]
        assert burst.blocker.result(timeout=WAIT_S).status_code == 200
    finally:
        burst.close()
    for r in replies:
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "bad_upstream_response"
    assert queue_depth(bproxy, model) == 0


def test_a_malformed_batch_endpoint_entry_fails_only_its_request(bproxy, mock):
    burst = mock_burst(bproxy, mock, "m-chat", "mock-chat")
    body = {"model": "m-chat", "messages": [{"role": "user", "content": "hi"}]}
    try:
        burst.start(lambda: post(bproxy, "/v1/chat/completions", body))
        futures = burst.queue([lambda: post(bproxy, "/v1/chat/completions", body)] * 3)
        mock.fault(results="malformed_entry", count=1, model="mock-chat")
        httpx.post(mock.url + "/mock/release")
        statuses = [f.result(timeout=WAIT_S).status_code for f in futures]
    finally:
        burst.close()
    assert sorted(statuses) == [200, 200, 502]  # the first in the batch, whichever request that was


def test_a_backend_that_never_answers_times_out_every_waiting_request(bproxy, mock):
    # The mock holds the blocker and never releases it on its own: the model's 1 s timeout bounds
    # the blocker's call, and the same timeout bounds each queued request, queue time included.
    burst = mock_burst(bproxy, mock, "m-slow", "mock-slow")
    try:
        burst.start(lambda: post(bproxy, "/v1/embeddings", {"model": "m-slow", "input": "blocker"}, timeout=30))
        mock.fault(hold=True, count=1, model="mock-slow")  # whatever is sent next is held too
        futures = [
            burst._pool.submit(post, bproxy, "/v1/embeddings", {"model": "m-slow", "input": f"q{i}"}, 30)
            for i in range(3)
        ]
        statuses = [f.result(timeout=30).status_code for f in futures]
        assert burst.blocker.result(timeout=30).status_code == 504
    finally:
        httpx.post(mock.url + "/mock/release")
        burst.close()
    assert statuses == [504, 504, 504]
    assert queue_depth(bproxy, "m-slow") == 0


# Batches bounded by the model's memory -------------------------------------------------------------


def memory_in_flight(proxy: Server, model: str) -> float:
    return metric(proxy, "llm_proxy_batch_memory_in_flight_mb", model=model)


def test_memory_bounds_a_batch_of_completions_on_the_reference_backend(bproxy, ref):
    # 100 tokens in flight; each request holds its prompt plus 45 output tokens: two per call, not four.
    reserved = metric(bproxy, "llm_proxy_batch_memory_reserved_mb_count", model="comp-mem")
    burst = reference_burst(bproxy, ref, "comp-mem")
    body = {"model": "comp-mem", "max_tokens": 45, "temperature": 0}
    try:
        burst.start(lambda: post(bproxy, "/v1/completions", {**body, "prompt": "blocker"}))
        futures = burst.queue(
            [lambda i=i: post(bproxy, "/v1/completions", {**body, "prompt": f"q{i}"}) for i in range(4)]
        )
        assert memory_in_flight(bproxy, "comp-mem") == pytest.approx(45 + counter_for("tiny-llama").prompt("blocker"))
        ref.control(hold=False)
        replies = [f.result(timeout=WAIT_S) for f in futures]
        assert burst.blocker.result(timeout=WAIT_S).status_code == 200
    finally:
        burst.close()
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    assert all(len(r.json()["choices"][0]["text"]) == 45 for r in replies)
    assert ref.stats()["rows"] == [1, 2, 2]  # count-only batching would have sent [1, 4]
    assert metric(bproxy, "llm_proxy_batch_memory_reserved_mb_count", model="comp-mem") - reserved == 3
    assert metric(bproxy, "llm_proxy_batch_memory_budget_mb", model="comp-mem") == pytest.approx(100)
    wait_for(lambda: memory_in_flight(bproxy, "comp-mem") == 0, "the memory in flight to return to zero")


def test_a_request_that_can_never_fit_gets_400_before_any_budget_is_reserved(bproxy, ref):
    calls = ref.calls("/v1/completions")
    spent = metric(bproxy, "llm_proxy_spend_usd_total", team="beta")
    # Team beta's budget refuses any reservation (429): a 400 shows the memory check came first.
    client = client_for(bproxy, "beta", timeout=WAIT_S)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="comp-mem", prompt="too long an answer", max_tokens=200)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["code"] == "exceeds_model_memory" and err["param"] == "max_tokens", err
    assert "in the GPU memory of model 'comp-mem'" in err["message"] and "100 MB (100 tokens)" in err["message"]
    with pytest.raises(openai.RateLimitError):  # a request that fits meets the budget, as usual
        client.completions.create(model="comp-mem", prompt="fits", max_tokens=10)
    assert ref.calls("/v1/completions") == calls
    assert metric(bproxy, "llm_proxy_spend_usd_total", team="beta") == spent
    assert queue_depth(bproxy, "comp-mem") == 0 and memory_in_flight(bproxy, "comp-mem") == 0
    r = post(bproxy, "/v1/proxy/explain", {"model": "comp-mem", "prompt": "too long an answer", "max_tokens": 200})
    explained = r.json()
    assert explained["decision"] == "rejected" and explained["error"]["code"] == "exceeds_model_memory"
    assert explained["model_memory"]["fits"] is False and explained["model_memory"]["budget_tokens"] == 100
    assert explained["model_memory"]["tokens"] == explained["prompt_tokens"] + 200


class RawClient:
    """An HTTP client that can hang up at a moment the test chooses (a socket it closes)."""

    def __init__(self, proxy: Server, body: dict):
        data = orjson.dumps(body)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.sock = socket.create_connection(("127.0.0.1", proxy.port))
        self.sock.sendall(head.encode() + data)

    def hang_up(self) -> None:
        self.sock.close()


def test_clients_that_disconnect_mid_queue_and_mid_batch_leave_no_memory_reserved(bproxy, mock):
    body = {"model": "m-mem", "max_tokens": 45}
    mock.fault(hold=True, count=2, model="mock-mem")  # the first call, then the first batch, wait for release
    pool = ThreadPoolExecutor(max_workers=4)
    try:
        at_once = RawClient(bproxy, {**body, "prompt": "at once"})
        wait_for(lambda: mock.stats()["held"] == 1, "the mock to hold the first call")
        queued_gone = RawClient(bproxy, {**body, "prompt": "hangs up queued"})
        wait_for(lambda: queue_depth(bproxy, "m-mem") == 1, "a request to queue")
        batch_gone = RawClient(bproxy, {**body, "prompt": "hangs up in its batch"})
        wait_for(lambda: queue_depth(bproxy, "m-mem") == 2, "a request to queue")
        stays = []
        for i in range(2):
            stays.append(pool.submit(post, bproxy, "/v1/completions", {**body, "prompt": f"stays {i}"}))
            wait_for(lambda n=3 + i: queue_depth(bproxy, "m-mem") == n, "a request to queue")
        queued_gone.hang_up()
        wait_for(lambda: queue_depth(bproxy, "m-mem") == 3, "the queued request to leave the queue")
        at_once.hang_up()  # its call is cancelled: its memory frees and the next batch (two requests) leaves
        wait_for(lambda: mock.stats()["calls"].get("/v1/completions") == 2, "the next batch to reach the mock")
        assert mock.stats()["last_bodies"][-1]["prompt"] == ["hangs up in its batch", "stays 0"]
        batch_gone.hang_up()
        httpx.post(mock.url + "/mock/release")
        replies = [f.result(timeout=WAIT_S) for f in stays]
    finally:
        httpx.post(mock.url + "/mock/release")
        pool.shutdown(wait=False, cancel_futures=True)
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    wait_for(lambda: memory_in_flight(bproxy, "m-mem") == 0, "the memory in flight to return to zero")
    wait_for(lambda: queue_depth(bproxy, "m-mem") == 0, "the queue to empty")
    sent = [b["prompt"] for b in mock.stats()["last_bodies"] if b.get("model") == "mock-mem"]
    assert sent == ["at once", ["hangs up in its batch", "stays 0"], "stays 1"]  # never the one that hung up queued


# The batcher on its own, against a real HTTP server on loopback ------------------------------------


class LoopbackMock:
    """The mock upstream served in this process on loopback, and a batcher in front of it."""

    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session, self.base = session, base

    def batcher(self, facts: dict[str, Any] | None = None, **batching: Any) -> MicroBatcher:
        cfg = ModelConfig(
            api_base=self.base + "/v1",
            upstream_model="u",
            mode="embedding",
            batching={"mode": "embeddings", **batching},
            **(facts or {}),
        )
        return MicroBatcher(OpenAICompatUpstream("unit-emb", cfg, self.session, 5.0))

    async def post(self, path: str, body: Any = None) -> None:
        async with self.session.post(self.base + path, json=body) as r:
            r.raise_for_status()

    async def stats(self) -> dict:
        async with self.session.get(self.base + "/mock/stats") as r:
            return await r.json()

    async def hold_blocker(self, batcher: MicroBatcher, holds: int = 1, tokens: int | None = None) -> asyncio.Task:
        await self.post("/mock/faults", {"hold": True, "count": holds})
        blocker = _send(batcher, "blocker", tokens)

        async def held() -> bool:
            return (await self.stats())["held"] == 1

        await _until(held)
        return blocker


@pytest.fixture
async def loopback() -> Any:
    runner = web.AppRunner(build_mock_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with aiohttp.ClientSession() as session:
            yield LoopbackMock(session, f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()


def _send(batcher: MicroBatcher, text: str, tokens: int | None = None) -> asyncio.Task:
    return asyncio.create_task(batcher.send("embeddings", {"model": "unit-emb", "input": text}, tokens))


async def _until(check: Callable[[], Any]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not await check():
            await asyncio.sleep(0.01)  # polling the mock's counters and the queue


async def test_a_cancelled_request_leaves_the_queue_and_is_never_sent(loopback):
    batcher = loopback.batcher()
    blocker = await loopback.hold_blocker(batcher)
    tasks = [_send(batcher, f"q{i}") for i in range(3)]

    async def all_queued() -> bool:
        return batcher._queued == 3

    await _until(all_queued)
    tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert batcher._queued == 2
    await loopback.post("/mock/release")
    replies = await asyncio.gather(blocker, tasks[0], tasks[2])
    assert all(len(r.data["data"]) == 1 for r in replies)
    stats = await loopback.stats()
    assert stats["calls"]["/v1/embeddings"] == 2
    assert stats["last_bodies"][-1]["input"] == ["q0", "q2"]  # q1 was never sent


async def test_a_batch_leaves_as_soon_as_the_clients_of_the_last_call_are_back(loopback):
    # A one-minute window that must never be waited out: once a call has answered N requests, the
    # next batch leaves as soon as N more have arrived (a closed loop of clients is back).
    batcher = loopback.batcher(max_wait_ms=60_000)
    blocker = await loopback.hold_blocker(batcher)
    first = [_send(batcher, f"first {i}") for i in range(3)]

    async def all_queued() -> bool:
        return batcher._queued == 3

    await _until(all_queued)
    await loopback.post("/mock/release")
    async with asyncio.timeout(WAIT_S / 2):
        await blocker
        # The blocker's call answered one request: its client sends again, and the four leave together.
        await asyncio.gather(_send(batcher, "blocker again"), *first)
        await asyncio.gather(*(_send(batcher, f"second {i}") for i in range(4)))
    stats = await loopback.stats()
    assert stats["calls"]["/v1/embeddings"] == 3
    assert [b["input"] for b in stats["last_bodies"]][-2:] == [
        ["first 0", "first 1", "first 2", "blocker again"],
        ["second 0", "second 1", "second 2", "second 3"],
    ]


# Bad policy files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_yaml", "path", "message"),
    [
        (
            "provider: anthropic\n    batching: {mode: batch_endpoint}",
            "models.m.batching",
            "provider 'anthropic' cannot batch",
        ),
        ("batching: {max_batch_size: 0}", "models.m.batching.max_batch_size", "greater than or equal to 1"),
        ("batching: {max_wait_ms: -1}", "models.m.batching.max_wait_ms", "greater than or equal to 0"),
        ("batching: {mode: embeddings}", "models.m.batching.mode", "does not fit the model's mode 'chat'"),
        ("mode: embedding\n    batching: {mode: completions}", "models.m.batching.mode", "mode: chat or completion"),
        ("batching: {mode: sometimes}", "models.m.batching.mode", "Input should be"),
    ],
)
def test_check_rejects_batching_that_cannot_work(tmp_path, model_yaml, path, message):
    text = f"version: 1\nmodels:\n  m:\n    {model_yaml}\n"
    with pytest.raises(ConfigError) as e:
        parse_policy_text(text, "p.yaml", {})
    issues = [str(i) for i in e.value.issues]
    assert len(issues) == 1 and issues[0].startswith("p.yaml:") and f": {path}: " in issues[0], issues
    assert message in issues[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and path in r.stderr


def test_batching_on_an_openai_compatible_model_passes_check():
    policy = parse_policy_text(
        "models:\n  m:\n    api_base: http://127.0.0.1:1/v1\n    batching: {mode: completions, max_wait_ms: 0}\n",
        "p.yaml",
        {},
    )
    assert policy.models["m"].batching is not None


async def test_a_memory_bounded_batch_takes_requests_in_order_while_their_tokens_fit(loopback):
    batcher = loopback.batcher(MEMORY_100_TOKENS, max_wait_ms=2)
    blocker = await loopback.hold_blocker(batcher, tokens=10)
    assert batcher.tokens_in_flight == 10
    tasks = [_send(batcher, name, tokens) for name, tokens in (("a", 40), ("b", 40), ("c", 40), ("d", 15))]

    async def all_queued() -> bool:
        return batcher._queued == 4

    await _until(all_queued)
    await loopback.post("/mock/release")
    await asyncio.gather(blocker, *tasks)
    stats = await loopback.stats()
    # a + b = 80 tokens; c would make 120 of 100: it leads the next call. Count-only: one call of four.
    assert [b["input"] for b in stats["last_bodies"]][-2:] == [["a", "b"], ["c", "d"]]
    assert batcher.tokens_in_flight == 0 and batcher._queued == 0


async def test_a_request_that_can_never_fit_is_refused_before_it_queues(loopback):
    batcher = loopback.batcher(MEMORY_100_TOKENS)
    with pytest.raises(ExceedsModelMemory) as e:
        await _send(batcher, "x", 101)
    assert e.value.status == 400 and "101 tokens" in e.value.message and "(100 tokens)" in e.value.message
    with pytest.raises(ExceedsModelMemory):  # counted by the batcher itself when the caller did not count
        await _send(batcher, "word " * 150)
    assert batcher._queued == 0 and batcher.tokens_in_flight == 0
    assert (await loopback.stats())["calls"].get("/v1/embeddings", 0) == 0
    reply = await _send(batcher, "fits", 100)  # exactly the budget fits
    assert len(reply.data["data"]) == 1 and batcher.tokens_in_flight == 0


async def test_cancelled_requests_mid_queue_and_mid_batch_give_their_memory_back(loopback):
    batcher = loopback.batcher(MEMORY_100_TOKENS, max_wait_ms=2)
    blocker = await loopback.hold_blocker(batcher, holds=2, tokens=10)  # sent at once; then the next call holds
    tasks = {name: _send(batcher, name, 40) for name in ("a", "b", "c")}

    async def queued(n: int) -> bool:
        return batcher._queued == n

    await _until(lambda: queued(3))
    tasks["b"].cancel()  # mid-queue
    with pytest.raises(asyncio.CancelledError):
        await tasks["b"]
    assert batcher._queued == 2 and batcher.tokens_in_flight == 10
    blocker.cancel()  # mid-call: its memory frees and the next batch (a + c) leaves

    async def batch_sent() -> bool:
        return (await loopback.stats())["calls"].get("/v1/embeddings") == 2

    await _until(batch_sent)
    assert batcher.tokens_in_flight == 80
    tasks["a"].cancel()  # mid-batch: the backend still holds its share until the call ends
    with pytest.raises(asyncio.CancelledError):
        await tasks["a"]
    assert batcher.tokens_in_flight == 80
    await loopback.post("/mock/release")
    assert len((await tasks["c"]).data["data"]) == 1

    async def nothing_reserved() -> bool:
        return batcher.tokens_in_flight == 0 and batcher._queued == 0

    await _until(nothing_reserved)
    assert [b["input"] for b in (await loopback.stats())["last_bodies"]][-2:] == ["blocker", ["a", "c"]]
