"""OpenTelemetry traces through the real server: spans reach an OTLP/HTTP receiver (here, in the test
process, decoding the protobuf with opentelemetry-proto), carry the GenAI and llm_proxy attributes and
nothing secret, continue the client's `traceparent` and pass it upstream; a collector that is down
fails nothing."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import MASTER_KEY, TEAM_KEYS, free_port, policy_yaml, start_proxy, wait_for
from tests.recording_upstream import RecordingUpstream

PROMPT = "The secret launch code is tangerine-4471; summarise it."


class OTLPReceiver:
    """An OTLP/HTTP trace receiver: `POST /v1/traces` with a protobuf ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.raw: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            receiver.spans.append(
                                {
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    "kind": span.kind,
                                    "status": span.status.code,
                                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                                    "links": [link.span_id.hex() for link in span.links],
                                    "resource": resource,
                                }
                            )
                receiver.raw.append(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: str) -> list[dict]:
        return [s for s in self.spans if s["trace_id"] == trace_id]


def _value(v) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server
    server.stop()


def _traced_proxy(tmp: Path, upstream_url: str, endpoint: str):
    extra = """\
        policies:
          - name: be-concise
            when: {models: [big]}
            concise: {instruction: "Be concise.", holdout: 0}
        """
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_SAMPLER": "always_on"}
    return start_proxy(tmp, policy_yaml(upstream_url, extra), env=env)


@pytest.fixture(scope="module")
def traced(session_tmp: Path, upstream: RecordingUpstream, receiver: OTLPReceiver):
    server = _traced_proxy(session_tmp, upstream.url, receiver.url)
    yield server
    server.stop()


def test_a_request_span_reaches_the_collector_with_genai_attributes_and_continues_the_clients_trace(
    traced, receiver, upstream
):
    upstream.reset()
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key=TEAM_KEYS["alpha"], max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="big",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=50,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    spans = wait_for(lambda: len(receiver.trace(trace_id)) >= 2 and receiver.trace(trace_id), "the spans")
    server = next(s for s in spans if s["parent"] == client_span)
    attrs = server["attributes"]
    assert server["name"] == "chat big" and server["kind"] == 2  # SPAN_KIND_SERVER
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "big"
    assert attrs["gen_ai.response.model"] == reply.headers["x-llm-proxy-model"]
    usage = reply.parse().usage
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attrs["llm_proxy.team"] == "alpha"
    assert attrs["llm_proxy.route"] == "upstream"
    assert attrs["llm_proxy.policies"] == ["be-concise"]
    assert attrs["llm_proxy.cost_usd"] == pytest.approx(float(reply.headers["x-llm-proxy-cost-usd"]))
    assert attrs["llm_proxy.saved_usd"] == pytest.approx(float(reply.headers["x-llm-proxy-saved-usd"]))
    assert attrs["llm_proxy.request_id"] == reply.headers["x-llm-proxy-request-id"]
    assert server["resource"]["service.name"] == "llm-numbers-proxy"

    attempt = next(s for s in spans if s["parent"] == server["span_id"])
    assert attempt["kind"] == 3 and attempt["attributes"]["gen_ai.request.model"] == "big"  # SPAN_KIND_CLIENT
    sent = upstream.headers[-1]["traceparent"]
    assert sent == f"00-{trace_id}-{attempt['span_id']}-01"  # the upstream continues the same trace

    exported = b"".join(receiver.raw)  # neither prompt text nor any key, anywhere in what was exported
    for secret in ("tangerine-4471", "Be concise", TEAM_KEYS["alpha"]):
        assert secret.encode() not in exported


def test_every_upstream_attempt_is_a_child_span(traced, receiver, upstream):
    upstream.reset()
    fault = {"status": 503, "count": 1, "model": "mock-small"}
    httpx.post(upstream.url + "/mock/faults", json=fault).raise_for_status()
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        traced.url + "/v1/chat/completions",
        json={"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "traceparent": f"00-{trace_id}-{'1' * 16}-01"},
    )
    assert r.status_code == 200
    spans = wait_for(lambda: len(receiver.trace(trace_id)) >= 3 and receiver.trace(trace_id), "three spans")
    server = next(s for s in spans if s["parent"] == "1" * 16)
    attempts = [s for s in spans if s["parent"] == server["span_id"]]
    assert len(attempts) == 2
    assert [a["status"] for a in attempts].count(2) == 1  # one failed (STATUS_CODE_ERROR), then one succeeded
    assert {h["traceparent"].split("-")[2] for h in upstream.headers} == {a["span_id"] for a in attempts}


def test_a_refused_request_is_traced_as_an_error_without_its_key(traced, receiver):
    trace_id = secrets.token_hex(16)
    r = httpx.post(
        traced.url + "/v1/chat/completions",
        json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer sk-not-a-key-9981", "traceparent": f"00-{trace_id}-{'2' * 16}-01"},
    )
    assert r.status_code == 401
    (span,) = wait_for(lambda: receiver.trace(trace_id), "the span")
    assert span["attributes"]["error.type"] == "invalid_api_key"
    assert span["attributes"]["http.response.status_code"] == 401
    assert b"sk-not-a-key-9981" not in b"".join(receiver.raw)


def test_an_unsampled_request_still_passes_its_trace_upstream(session_tmp, upstream, receiver):
    server = start_proxy(
        session_tmp,
        policy_yaml(upstream.url),
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_TRACES_SAMPLER": "always_off"},
    )
    try:
        upstream.reset()
        trace_id = secrets.token_hex(16)
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "traceparent": f"00-{trace_id}-{'3' * 16}-01"},
        )
        assert r.status_code == 200, r.text
        version, sent_trace, _, flags = upstream.headers[-1]["traceparent"].split("-")
        assert (version, sent_trace, flags) == ("00", trace_id, "00")  # same trace, marked not sampled
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_a_collector_that_is_down_fails_no_request(session_tmp, upstream):
    with socket_that_refuses() as dead:
        server = _traced_proxy(session_tmp, upstream.url, dead)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=TEAM_KEYS["alpha"], max_retries=0)
            for _ in range(20):
                assert client.chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}])
        finally:
            server.stop()
    assert "Traceback" not in server.log()


class socket_that_refuses:
    """A loopback URL nothing listens on (the port is bound, never listened to, so nothing else takes it)."""

    def __enter__(self) -> str:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


OFF_PROBE = """
import asyncio, sys
from proxy.app import create_app
app = create_app("policies/default.yaml")
async def main():
    await app.state.start()
    # Only the proxy's own tracing imports are checked: redis-py 8 imports the SDK's metrics module
    # by itself whenever the SDK is installed (hence the `tracing` extra).
    ours = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.proto")
    print(app.state.tracing is None, any(m.startswith(ours) for m in sys.modules))
    await app.state.stop()
asyncio.run(main())
"""


DISABLED = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}


@pytest.mark.parametrize("env", [{}, DISABLED])
def test_off_tracing_imports_no_opentelemetry(env):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    r = subprocess.run(
        [sys.executable, "-c", OFF_PROBE], capture_output=True, text=True, cwd=ROOT, env={**clean, **env}, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["True", "False"]


RETRIEVAL = """\
    collections:
      docs: {kind: kb, embedder: embed}
    policies:
      - name: docs
        # The mock's embeddings carry no meaning: every query matches its best entry, guards off.
        when: {models: [big]}
        retrieve: {collection: docs, min_similarity: -1, min_margin: 0, decisive_tokens: false}
    """


def test_a_retrieval_lookup_is_a_child_span_with_its_embedding_and_search_under_it(session_tmp, mock, receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    server = start_proxy(session_tmp, policy_yaml(mock.url, RETRIEVAL), env=env)
    try:
        admin = {"Authorization": f"Bearer {MASTER_KEY}"}
        entries = [{"id": "reset", "question": "How do I reset my password?", "answer": "Use the reset link."}]
        r = httpx.post(f"{server.url}/admin/kb/docs", json=entries, headers=admin)
        assert r.status_code == 200, r.text
        wait_for(lambda: httpx.get(server.url + "/readyz").json()["collections"]["docs"]["ready"], "the collection")
        trace_id = secrets.token_hex(16)
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": PROMPT}]},
            headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "traceparent": f"00-{trace_id}-{'2' * 16}-01"},
        )
        assert r.status_code == 200 and r.headers["x-llm-proxy-route"] == "retrieval", r.text
        spans = wait_for(lambda: len(receiver.trace(trace_id)) >= 5 and receiver.trace(trace_id), "five spans")
    finally:
        server.stop()
    request = next(s for s in spans if s["parent"] == "2" * 16)
    lookup = next(s for s in spans if s["parent"] == request["span_id"])
    assert lookup["name"] == "retrieval docs" and lookup["kind"] == 1  # SPAN_KIND_INTERNAL
    assert lookup["attributes"]["llm_proxy.retrieval.collection"] == "docs"
    assert lookup["attributes"]["llm_proxy.retrieval.hit"] is True
    under = {s["name"]: s for s in spans if s["parent"] == lookup["span_id"]}
    assert set(under) == {"embeddings embed", "search docs"}
    embedding = under["embeddings embed"]["attributes"]
    assert embedding["gen_ai.operation.name"] == "embeddings" and embedding["gen_ai.usage.input_tokens"] > 0
    assert isinstance(under["search docs"]["attributes"]["llm_proxy.retrieval.similarity"], float)
    # The embedding's call to its upstream: a client span under it (each attempt's, as for chat attempts,
    # whose traceparent the upstream gets: test_every_upstream_attempt_is_a_child_span).
    (call,) = [s for s in spans if s["parent"] == under["embeddings embed"]["span_id"]]
    assert call["name"] == "embeddings embed" and call["kind"] == 3  # SPAN_KIND_CLIENT
    assert b"tangerine-4471" not in b"".join(receiver.raw)


SHADOW = """\
    evaluation: {budget_usd_per_day: 10, workers: 1, timeout_s: 5}
    policies:
      - name: cheap
        when: {teams: [alpha], models: [big]}
        route: {to: small}
        shadow: {rate: 1.0, compare: exact}
    """


def test_a_shadow_call_is_a_trace_of_its_own_linked_to_the_requests_span(session_tmp, mock, receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    server = start_proxy(session_tmp, policy_yaml(mock.url, SHADOW), env=env)
    try:
        trace_id = secrets.token_hex(16)
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16},
            headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "traceparent": f"00-{trace_id}-{'3' * 16}-01"},
        )
        assert r.status_code == 200 and r.headers["x-llm-proxy-model"] == "small", r.text
        request = wait_for(
            lambda: next((s for s in receiver.trace(trace_id) if s["parent"] == "3" * 16), None), "the request span"
        )
        shadow = wait_for(
            lambda: next((s for s in receiver.spans if request["span_id"] in s["links"]), None), "the shadow span"
        )
    finally:
        server.stop()
    # Its own trace (a root span), linked to the request's span, the counterfactual call under it.
    assert shadow["name"] == "shadow cheap" and shadow["parent"] == "" and shadow["trace_id"] != trace_id
    assert shadow["attributes"]["gen_ai.request.model"] == "big"
    assert shadow["attributes"]["llm_proxy.shadow.outcome"] in ("win", "tie", "loss")
    calls = wait_for(lambda: [s for s in receiver.spans if s["parent"] == shadow["span_id"]], "the shadow's call")
    assert calls[0]["kind"] == 3 and calls[0]["attributes"]["gen_ai.request.model"] == "big"
    assert all(s["parent"] != request["span_id"] or s["kind"] == 3 for s in receiver.trace(trace_id))
