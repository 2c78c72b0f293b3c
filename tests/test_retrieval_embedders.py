"""Retrieval with an embedding model under `models:` (the mock upstream's, through the proxy's own
dispatch): priced lookups and min_cost_multiple, an embedder that is down, a model change that
alters the vector dimension, cache TTL and cache fill from streams, and `check` errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    ROOT,
    MockUpstream,
    Server,
    admin_spend,
    client_for,
    free_port,
    policy_yaml,
    start_process,
    start_proxy,
    team_spend,
    wait_for,
)

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
CACHE = {"x-test-cache": "1"}
CACHED_MODEL = "nousage"  # the cache tests' model: the `docs` policy does not apply to it

RETRIEVAL = """
collections:
  docs: {kind: kb, embedder: embed}
  quick: {kind: cache, embedder: embed, ttl_s: 2}
retrieval: {embed_timeout_s: 3}
tasks:
  anything: {examples: ["How do I reset my password?"], embedder: embed, min_similarity: -1}
policies:
  - name: quick
    when: {headers: {x-test-cache: "1"}}
    retrieve: {collection: quick, cache: true}
  - name: docs
    # The mock's embeddings carry no meaning: every query matches its best entry, guards off.
    when: {models: [big, small], task: anything}
    retrieve: {collection: docs, min_similarity: -1, min_margin: 0, decisive_tokens: false, min_cost_multiple: 5000}
"""


@pytest.fixture(scope="module")
def emock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    tmp = tmp_path_factory.mktemp("emock")
    port = free_port()
    server = start_process(["mock-upstream", "--port", str(port)], port, "/v1/models", tmp)
    mock = MockUpstream(server.proc, server.port, server.log_path)
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def eproxy(tmp_path_factory: pytest.TempPathFactory, emock: MockUpstream, redis_prefix: str) -> Iterator[Server]:
    emock.configure(embedding_dim=16)
    policy = policy_yaml(emock.url, f"store:\n  key_prefix: {redis_prefix}\n" + RETRIEVAL)
    tmp = tmp_path_factory.mktemp("eproxy")
    server = start_proxy(tmp, policy, redis_url=REDIS_URL)
    server.config = tmp / f"policy-{server.port}.yaml"  # where start_proxy wrote it (hot reload watches it)
    wait_for(lambda: status(server, "docs")["ready"], "the collection to load")
    yield server
    server.stop()


@pytest.fixture
def proxy(eproxy: Server, emock: MockUpstream) -> Server:
    emock.reset()
    emock.configure(embedding_dim=16)
    return eproxy


def status(server: Server, collection: str) -> dict:
    return httpx.get(server.url + "/readyz").json()["collections"][collection]


def ask(server: Server, question: str, model: str = "big", **kw):
    raw = client_for(server).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], **kw
    )
    return raw.headers, raw.parse()


def metric(server: Server, prefix: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def load_docs(server: Server) -> None:
    entries = [{"id": "reset", "question": "How do I reset my password?", "answer": "Use the reset link."}]
    r = httpx.post(f"{server.url}/admin/kb/docs", json=entries, headers=ADMIN)
    assert r.status_code == 200, r.text


def test_a_lookup_costs_its_embedding_and_only_where_generating_costs_more(proxy: Server, emock: MockUpstream) -> None:
    load_docs(proxy)
    ask(proxy, "warm up: the task's examples are embedded once")
    embeds = emock.calls("/v1/embeddings")
    headers, reply = ask(proxy, "password help please")
    assert headers["x-llm-proxy-route"] == "retrieval" and reply.choices[0].message.content == "Use the reset link."
    # The task matcher and the retrieve action shared one embedding of the question.
    assert emock.calls("/v1/embeddings") == embeds + 1 and emock.calls("/v1/chat/completions") == 0
    cost, saved = float(headers["x-llm-proxy-cost-usd"]), float(headers["x-llm-proxy-saved-usd"])
    assert 0 < cost < 1e-6 and saved > 1000 * cost
    # On `small` generating costs less than 5000x the lookup: not worth the risk of a wrong answer.
    headers, _ = ask(proxy, "password help please", model="small")
    assert headers["x-llm-proxy-route"] == "upstream" and emock.calls("/v1/chat/completions") == 1
    assert (
        metric(proxy, 'llm_proxy_retrieval_lookups_total{collection="docs",policy="docs",result="not_worth_it"}') >= 1
    )
    # Embedding calls are spend too: the miss above recorded none (not worth it), the hit its own cost.
    assert admin_spend(proxy)["teams"]["alpha"]["spend_usd"] > 0


def test_a_miss_tells_its_lookup_embedding_in_the_cost_header(proxy: Server, emock: MockUpstream) -> None:
    def spend() -> tuple[float, float]:
        alpha = team_spend(proxy, "alpha")
        return alpha["spend_usd"], alpha["by_model"].get("embed", {}).get("spend_usd", 0.0)

    before, embed_before = spend()
    headers, reply = ask(
        proxy, f"a question nobody asked before {time.time()}", model=CACHED_MODEL, extra_headers=CACHE
    )
    assert headers["x-llm-proxy-route"] == "upstream" and reply.choices[0].message.content
    told = float(headers["x-llm-proxy-cost-usd"])
    # The team paid for the answer and for the cache lookup's embedding: the header says both.
    _, embed_after = wait_for(
        lambda: (s := spend())[0] == pytest.approx(before + told, rel=1e-9, abs=1e-12) and s,
        "the request's spend to equal its cost header",
        timeout=10,
    )
    assert embed_after > embed_before  # the lookup was priced, so the header holds more than the answer


def test_an_embedder_that_is_down_sends_requests_upstream(proxy: Server, emock: MockUpstream) -> None:
    load_docs(proxy)
    before = metric(proxy, 'llm_proxy_embedder_errors_total{embedder="embed",kind="upstream"}')
    emock.fault(status=500, path="/v1/embeddings", count=100)
    headers, reply = ask(proxy, "how to change my password")
    assert headers["x-llm-proxy-route"] == "upstream" and reply.choices[0].message.content
    assert emock.calls("/v1/chat/completions") == 1
    assert metric(proxy, 'llm_proxy_embedder_errors_total{embedder="embed",kind="upstream"}') == before + 1
    # Here the policy's task matcher met the outage first: the request is not in the task, no lookup.
    down = 'llm_proxy_retrieval_lookups_total{collection="-",policy="task:anything",result="embedder_down"}'
    assert metric(proxy, down) >= 1
    # A retrieve action that meets it skips the lookup (and the cache fill) and goes upstream too.
    headers, _ = ask(proxy, f"anything new? {time.time()}", model=CACHED_MODEL, extra_headers=CACHE)
    assert headers["x-llm-proxy-route"] == "upstream" and emock.calls("/v1/chat/completions") == 2
    assert (
        metric(proxy, 'llm_proxy_retrieval_lookups_total{collection="quick",policy="quick",result="embedder_down"}')
        >= 1
    )
    emock.reset()
    assert ask(proxy, "how to change my password")[0]["x-llm-proxy-route"] == "retrieval"


def test_vectors_of_a_changed_model_are_never_mixed_and_the_index_is_rebuilt(
    proxy: Server, emock: MockUpstream
) -> None:
    load_docs(proxy)
    assert ask(proxy, "forgot my password")[0]["x-llm-proxy-route"] == "retrieval"
    assert status(proxy, "docs")["identity"].endswith(":16")
    emock.configure(embedding_dim=24)  # the self-hosted server now runs another model
    headers, _ = ask(proxy, "forgot my password")
    assert headers["x-llm-proxy-route"] == "upstream"  # 24 dimensions never meet 16
    rebuilt = wait_for(
        lambda: (s := status(proxy, "docs"))["ready"] and s["identity"].endswith(":24") and s, "the index rebuild"
    )
    assert rebuilt["entries"] >= 1
    headers, reply = ask(proxy, "forgot my password")
    assert headers["x-llm-proxy-route"] == "retrieval" and reply.choices[0].message.content == "Use the reset link."
    emock.configure(embedding_dim=16)  # and back, for the tests after this one
    ask(proxy, "forgot my password")
    wait_for(lambda: (s := status(proxy, "docs"))["ready"] and s["identity"].endswith(":16"), "the second rebuild")


def test_cache_entries_expire(proxy: Server, emock: MockUpstream) -> None:
    question = f"What is the build number today? {time.time()}"

    def route() -> str:
        return ask(proxy, question, model=CACHED_MODEL, extra_headers=CACHE)[0]["x-llm-proxy-route"]

    assert route() == "upstream"
    wait_for(lambda: route() == "retrieval", "the fill")
    wait_for(lambda: route() == "upstream", "the expiry")


def test_a_streamed_answer_fills_the_cache(proxy: Server, emock: MockUpstream) -> None:
    question = f"Stream me a story {time.time()}"
    client = client_for(proxy)
    stream = client.chat.completions.create(
        model=CACHED_MODEL, messages=[{"role": "user", "content": question}], stream=True, extra_headers=CACHE
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed
    _, reply = wait_for(
        lambda: (
            (r := ask(proxy, question, model=CACHED_MODEL, extra_headers=CACHE))[0]["x-llm-proxy-route"] == "retrieval"
            and r
        ),
        "the fill",
    )
    assert reply.choices[0].message.content == streamed


def test_a_reload_onto_another_embedding_model_rebuilds_the_index(proxy: Server, emock: MockUpstream) -> None:
    load_docs(proxy)
    assert ask(proxy, "password reset steps")[0]["x-llm-proxy-route"] == "retrieval"
    entries = status(proxy, "docs")["entries"]
    # Same name, same dimension, another model behind it: its vectors must not meet the old ones.
    text = proxy.config.read_text()
    assert "upstream_model: mock-embed\n" in text
    proxy.config.write_text(text.replace("upstream_model: mock-embed\n", "upstream_model: mock-embed-v2\n"))
    rebuilt = wait_for(
        lambda: (s := status(proxy, "docs"))["ready"] and "mock-embed-v2" in (s["identity"] or "") and s,
        "the reload and the rebuild",
    )
    assert rebuilt["entries"] == entries
    assert ask(proxy, "password reset steps")[0]["x-llm-proxy-route"] == "retrieval"
    assert emock.stats()["last_bodies"][-1]["model"] == "mock-embed-v2"


def test_check_reports_unknown_collections_and_embedders(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """\
            models:
              m: {api_base: "http://127.0.0.1:1/v1"}
              e: {api_base: "http://127.0.0.1:1/v1", mode: embedding}
            collections:
              faq: {kind: kb, embedder: nope}
              answers: {kind: cache, embedder: m}
            tasks:
              lookup: {examples: ["What is X?"], embedder: missing}
            policies:
              - name: a
                retrieve: {collection: missing}
              - name: b
                retrieve: {collection: faq, cache: true}
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(policy)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    for expected in [
        ":5: collections.faq.embedder: unknown embedder 'nope'",
        ":6: collections.answers.embedder: model 'm' is not an embedding model",
        ":8: tasks.lookup.embedder: unknown embedder 'missing'",
        ":11: policies[0].retrieve.collection: unknown collection 'missing'",
        ":13: policies[1].retrieve.cache: collection 'faq' is a kb",
    ]:
        assert expected in done.stderr, done.stderr
