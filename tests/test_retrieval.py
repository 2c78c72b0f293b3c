"""Retrieval through real servers: proxies as subprocesses with the local all-MiniLM-L6-v2 embedder
(loaded once per proxy process), a real Redis shared by two proxies, a dedicated mock upstream whose
call counts prove which requests reached it, and the openai SDK as the client."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    ROOT,
    START_TIMEOUT_S,
    MockUpstream,
    Server,
    client_for,
    free_port,
    launch_proxy,
    policy_yaml,
    start_process,
    wait_for,
    wait_until_serving,
)

ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}

# Many examples: they are embedded at load, in batches, never on a request under the lookup timeout.
_CITIES = [f"City{i}" for i in range(150)]
WEATHER_EXAMPLES = ["Will it rain tomorrow?", "What is the weather forecast for the weekend?"] + [
    f"What will the weather be like in {c} next week?" for c in _CITIES
]
RETRIEVAL = f"""
collections:
  faq: {{kind: kb}}
  answers: {{kind: cache, ttl_s: 600}}
  checked: {{kind: kb}}
  gated: {{kind: kb}}
tasks:
  weather: {{examples: {json.dumps(WEATHER_EXAMPLES)}, min_similarity: 0.6}}
policies:
  - name: no-weather
    when: {{task: weather}}
    reject: {{message: "Ask the weather service.", status: 403}}
  - name: faq
    when: {{models: [big]}}
    # low on purpose: the guards must catch near misses; max_error: feedback judges its hits
    retrieve: {{collection: faq, min_similarity: 0.85, max_error: 0.05}}
  - name: cache
    when: {{models: [big]}}
    retrieve: {{collection: answers, cache: true}}
  - name: checked
    when: {{models: [small]}}
    retrieve: {{collection: checked, min_similarity: 0.995, verify: {{model: small, band: [0.8, 0.995]}}}}
  - name: gated
    when: {{models: [small]}}
    # worth it for the embedding alone (free), not with the check's cost: generation is ~10x the check
    retrieve:
      collection: gated
      min_similarity: 0.995
      min_cost_multiple: 50
      verify: {{model: small, band: [0.8, 0.995]}}
"""


def collections_ready(server: Server) -> dict:
    status = httpx.get(server.url + "/readyz").json().get("collections", {})
    return status if status and all(c["ready"] for c in status.values()) else {}


@pytest.fixture(scope="module")
def rmock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    """A mock upstream of these tests alone: its call counts are theirs."""
    tmp = tmp_path_factory.mktemp("rmock")
    port = free_port()
    server = start_process(["mock-upstream", "--port", str(port)], port, "/v1/models", tmp)
    mock = MockUpstream(server.proc, server.port, server.log_path)
    yield mock
    mock.stop()


def launch_proxies(tmp: Path, policy: str, n: int, redis_url: str | None = None) -> list[Server]:
    """Start `n` proxies at once and wait for all: with a local embedder a proxy serves only once its
    model is loaded (several seconds each on a busy machine, more than conftest's start-up wait)."""
    servers = []
    for _ in range(n):
        servers.append(launch_proxy(tmp, policy, redis_url))
    try:
        for s in servers:
            wait_until_serving(s.url + "/healthz", s.proc, timeout=max(180, START_TIMEOUT_S))
            wait_for(lambda s=s: collections_ready(s), "the collections to load", timeout=60)
    except Exception as e:
        logs = "\n".join(s.log() for s in servers)
        for s in servers:
            s.stop()
        raise RuntimeError(f"proxies did not start:\n{logs}") from e
    return servers


@pytest.fixture(scope="module")
def kb_proxies(
    tmp_path_factory: pytest.TempPathFactory, rmock: MockUpstream, redis_prefix: str
) -> Iterator[list[Server]]:
    """Two replicas sharing one Redis (same key prefix), started together so their models load at once."""
    policy = policy_yaml(rmock.url, f"store:\n  key_prefix: {redis_prefix}\n" + RETRIEVAL)
    servers = launch_proxies(tmp_path_factory.mktemp("kb"), policy, 2, REDIS_URL)
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def proxy1(kb_proxies: list[Server], rmock: MockUpstream) -> Server:
    rmock.reset()
    return kb_proxies[0]


def upsert(server: Server, collection: str, entries: list[dict]) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/kb/{collection}", json={"entries": entries}, headers=ADMIN, timeout=60)


def ask(server: Server, question: str, team: str = "alpha", model: str = "big", history: list | None = None):
    client = client_for(server, team)
    messages = [*(history or []), {"role": "user", "content": question}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    return raw.headers, raw.parse()


def served_by(answer) -> str | None:
    """The collection that answered, or None when the answer came from upstream."""
    header = answer[0].get("x-llm-proxy-retrieval")
    return header.split(";")[0].removeprefix("collection=") if header else None


def chat_calls(mock: MockUpstream) -> int:
    return mock.calls("/v1/chat/completions")


def unique(text: str) -> str:
    return f"{text} ({uuid.uuid4().hex[:6]})"


def test_a_kb_hit_answers_without_any_upstream_call(proxy1: Server, rmock: MockUpstream) -> None:
    r = upsert(
        proxy1,
        "faq",
        [
            {
                "id": "hamlet",
                "questions": ["Who wrote Hamlet?"],
                "answer": "William Shakespeare.",
                "source": "https://en.wikipedia.org/wiki/Hamlet",
            }
        ],
    )
    assert r.status_code == 200, r.text
    headers, reply = ask(proxy1, "Who is the author of Hamlet?")  # a paraphrase: embedded by the real model
    assert reply.choices[0].message.content == "William Shakespeare."
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason == "stop"
    assert headers["x-llm-proxy-route"] == "retrieval"
    assert headers["x-llm-proxy-policies"] == "faq"
    assert "entry=hamlet" in headers["x-llm-proxy-retrieval"]
    similarity = float(headers["x-llm-proxy-retrieval"].rsplit("=", 1)[1])
    assert 0.9 < similarity < 1.0  # not the exact-match path: the local embedder ran
    assert headers["x-llm-proxy-retrieval-source"] == "https://en.wikipedia.org/wiki/Hamlet"
    assert float(headers["x-llm-proxy-saved-usd"]) > 0
    assert float(headers["x-llm-proxy-cost-usd"]) == 0  # the local embedder is free unless priced
    assert chat_calls(rmock) == 0 and rmock.stats()["calls"] == {}


def test_a_near_miss_differing_in_a_number_or_a_name_goes_upstream(proxy1: Server, rmock: MockUpstream) -> None:
    upsert(
        proxy1,
        "faq",
        [
            {"id": "py312", "question": "What is new in Python 3.12?", "answer": "Better error messages, PEP 695."},
            {"id": "vat-de", "question": "What is the VAT rate in Germany?", "answer": "19%, or 7% reduced."},
        ],
    ).raise_for_status()
    # Rewordings hit (a demonym is the same name)...
    assert ask(proxy1, "What's new in Python 3.12")[0]["x-llm-proxy-route"] == "retrieval"
    headers, reply = ask(proxy1, "What is the German VAT rate?")
    assert headers["x-llm-proxy-route"] == "retrieval" and reply.choices[0].message.content == "19%, or 7% reduced."
    assert chat_calls(rmock) == 0
    # ...near misses above min_similarity (0.95 and 0.86 with this model) do not: the guards stop them.
    headers, reply = ask(proxy1, "What is new in Python 3.11?")
    assert headers["x-llm-proxy-route"] == "upstream"
    assert reply.choices[0].message.content != "Better error messages, PEP 695."
    assert ask(proxy1, "What is the VAT rate in Austria?")[0]["x-llm-proxy-route"] == "upstream"
    assert chat_calls(rmock) == 2
    metrics = httpx.get(proxy1.url + "/metrics").text
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith('llm_proxy_retrieval_lookups_total{collection="faq",policy="faq",result="token_mismatch"}')
    )
    assert float(line.rsplit(" ", 1)[1]) >= 2


def test_cache_entries_of_one_team_are_never_served_to_another(proxy1: Server, rmock: MockUpstream) -> None:
    question = unique("Summarise the plot of Moby Dick in one sentence")
    headers, first = ask(proxy1, question, team="alpha")
    assert headers["x-llm-proxy-route"] == "upstream" and chat_calls(rmock) == 1
    # The answer is stored after the response: poll until alpha gets it from the cache.
    headers, again = wait_for(
        lambda: (r := ask(proxy1, question, team="alpha"))[0]["x-llm-proxy-route"] == "retrieval" and r,
        "the cache fill",
    )
    assert again.choices[0].message.content == first.choices[0].message.content
    calls = chat_calls(rmock)
    beta = client_for(proxy1, "beta")  # beta may only use `small`: the same policy, its own scope
    for _ in range(3):
        raw = beta.chat.completions.with_raw_response.create(
            model="small", messages=[{"role": "user", "content": question}]
        )
        assert raw.headers["x-llm-proxy-route"] == "upstream"
    assert chat_calls(rmock) == calls + 3


def test_a_cache_entry_belongs_to_the_team_that_filled_it(proxy1: Server, rmock: MockUpstream) -> None:
    question = unique("Explain what a cache stampede is")
    ask(proxy1, question, team="alpha")
    wait_for(lambda: ask(proxy1, question, team="alpha")[0]["x-llm-proxy-route"] == "retrieval", "the cache fill")
    entries = httpx.get(proxy1.url + "/admin/kb/answers?limit=1000", headers=ADMIN).json()["entries"]
    mine = [e for e in entries if e["questions"] == [question]]
    assert len(mine) == 1 and mine[0]["teams"] == ["alpha"]


def test_two_proxies_see_the_same_kb_after_an_upsert_on_one(kb_proxies: list[Server], rmock: MockUpstream) -> None:
    one, two = kb_proxies
    rmock.reset()
    answer = unique("Refunds take five working days.")
    upsert(
        one, "faq", [{"id": "refunds", "question": "How long does a refund take?", "answer": answer}]
    ).raise_for_status()
    # Until the second replica sees the entry its answers come from upstream (and then its cache policy).
    _, reply = wait_for(
        lambda: served_by(r := ask(two, "How long does a refund take?")) == "faq" and r,
        "the second replica to see the upsert",
    )
    assert reply.choices[0].message.content == answer
    r = httpx.delete(f"{two.url}/admin/kb/faq/refunds", headers=ADMIN)
    assert r.status_code == 200, r.text
    wait_for(
        lambda: served_by(ask(one, "How long does a refund take?")) != "faq", "the first replica to see the delete"
    )
    assert httpx.delete(f"{two.url}/admin/kb/faq/refunds", headers=ADMIN).status_code == 404


def test_a_follow_up_never_hits_a_standalone_entry(proxy1: Server, rmock: MockUpstream) -> None:
    upsert(
        proxy1, "faq", [{"id": "rev-py", "question": "How do I reverse a list in Python?", "answer": "xs.reverse()"}]
    ).raise_for_status()
    assert ask(proxy1, "How do I reverse a list in Python?")[0]["x-llm-proxy-route"] == "retrieval"
    history = [
        {"role": "user", "content": "How do I reverse a list in Java?"},
        {"role": "assistant", "content": "Collections.reverse(list);"},
    ]
    headers, _ = ask(proxy1, "How do I reverse a list in Python?", history=history)
    assert headers["x-llm-proxy-route"] == "upstream"
    # A system prompt is part of the conversation too (system_prompt: match).
    system = [{"role": "system", "content": "Answer in French."}]
    assert ask(proxy1, "How do I reverse a list in Python?", history=system)[0]["x-llm-proxy-route"] == "upstream"


def test_a_hit_streams_as_sse_when_asked(proxy1: Server, rmock: MockUpstream) -> None:
    upsert(proxy1, "faq", [{"id": "tz", "question": "What time zone is Tokyo in?", "answer": "JST, UTC+9."}])
    client = client_for(proxy1)
    with client.chat.completions.with_streaming_response.create(
        model="big",
        messages=[{"role": "user", "content": "Which time zone is Tokyo in?"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-llm-proxy-route"] == "retrieval"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "JST, UTC+9."
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    assert chat_calls(rmock) == 0


def listed_ids(server: Server, collection: str) -> list[str]:
    r = httpx.get(f"{server.url}/admin/kb/{collection}?limit=1000", headers=ADMIN)
    return [e["id"] for e in r.json()["entries"]]


def test_kb_entries_expire(proxy1: Server, rmock: MockUpstream) -> None:
    question = "What is the wifi password of the Berlin office?"
    upsert(proxy1, "faq", [{"id": "wifi", "question": question, "answer": "hunter2", "ttl_s": 3}]).raise_for_status()
    assert ask(proxy1, question)[0]["x-llm-proxy-route"] == "retrieval"
    wait_for(lambda: ask(proxy1, question)[0]["x-llm-proxy-route"] == "upstream", "the entry to expire", timeout=20)
    wait_for(lambda: "wifi" not in listed_ids(proxy1, "faq"), "the store to purge it", timeout=20)


def test_tasks_match_by_examples_with_the_local_embedder(proxy1: Server, rmock: MockUpstream) -> None:
    # The examples were embedded at load, and readiness says so.
    wait_for(lambda: httpx.get(proxy1.url + "/readyz").json()["tasks"]["weather"]["ready"], "the task examples")
    assert httpx.get(proxy1.url + "/readyz").json()["tasks"]["weather"] == {
        "ready": True,
        "examples": len(WEATHER_EXAMPLES),
    }
    client = client_for(proxy1)
    with pytest.raises(Exception) as e:
        client.chat.completions.create(
            model="small", messages=[{"role": "user", "content": "Is it going to rain in Paris on Saturday?"}]
        )
    assert getattr(e.value, "status_code", None) == 403 and "weather service" in str(e.value)
    reply = client.chat.completions.create(
        model="small", messages=[{"role": "user", "content": "Write a haiku about proxies."}]
    )
    assert reply.choices[0].message.content
    assert chat_calls(rmock) == 1


def test_admin_upserts_are_all_or_nothing(proxy1: Server) -> None:
    good = {"id": "ok-1", "question": "Is the office open on Sunday?", "answer": "No."}
    for bad, message in [
        ({"id": "no-answer", "question": "Where is the office?"}, "'answer' is missing"),
        (dict(good), "duplicate id 'ok-1'"),
        ({"id": "x", "question": "Q?", "answer": "A.", "teams": ["nobody"]}, "unknown team"),
    ]:
        r = upsert(proxy1, "faq", [good, bad])
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and message in error["message"]
    assert "ok-1" not in listed_ids(proxy1, "faq")
    assert httpx.post(f"{proxy1.url}/admin/kb/faq", content=b"{not json", headers=ADMIN).status_code == 400
    assert upsert(proxy1, "nope", [good]).json()["error"]["code"] == "not_found"
    assert httpx.post(f"{proxy1.url}/admin/kb/faq", json=[good]).status_code == 401
    assert upsert(proxy1, "faq", []).status_code == 400


def test_kb_load_cli(proxy1: Server, rmock: MockUpstream, tmp_path: Path) -> None:
    def load(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "kb", "load", str(path), "--collection", "faq", "--url", proxy1.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"LLM_PROXY_MASTER_KEY": MASTER_KEY, "PATH": "/usr/bin:/bin"},
            timeout=60,
        )

    good = tmp_path / "kb.jsonl"
    good.write_text(
        json.dumps({"id": "cli-1", "question": "Who founded the Acme company?", "answer": "Wile E. Coyote."})
        + "\n"
        + json.dumps({"id": "cli-2", "questions": ["Where is Acme based?"], "answer": "In the desert."})
        + "\n"
    )
    done = load(good)
    assert done.returncode == 0, done.stderr
    assert "2 entries loaded into 'faq'" in done.stdout
    assert ask(proxy1, "Who founded the Acme company?")[0]["x-llm-proxy-route"] == "retrieval"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"id": "cli-3", "question": "Q3?", "answer": "A3"})
        + "\n"
        + json.dumps({"id": "cli-3", "question": "Q4?"})
        + "\n"
    )
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as f:
        f.truncate(65 * 1024 * 1024)
    control = tmp_path / "control.jsonl"
    control.write_text(json.dumps({"id": "cli-4", "question": "Q5?", "answer": "A5", "source": "x\r\nSet-Cookie: y"}))
    for path, message in [
        (empty, "no entries"),
        (bad, "'answer' is missing"),
        (huge, "the limit is"),
        (control, "control character"),
    ]:
        done = load(path)
        assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "cli-3" not in listed_ids(proxy1, "faq") and "cli-4" not in listed_ids(proxy1, "faq")


def test_kb_calibrate_picks_a_threshold_for_the_target_precision(tmp_path: Path) -> None:
    books = ["Hamlet", "Emma", "Dracula", "Ulysses", "Frankenstein", "Middlemarch", "Beloved", "Lolita"]
    countries = ["France", "Japan", "Kenya", "Peru", "Norway", "Canada", "Egypt", "Chile"]
    rows = []
    for i, b in enumerate(books):
        rows.append({"a": f"Who wrote {b}?", "b": f"Who is the author of {b}?", "label": True})
        rows.append({"a": f"Who wrote {b}?", "b": f"Who wrote {books[i - 1]}?", "label": False})
    for i, c in enumerate(countries):
        rows.append({"a": f"What is the capital of {c}?", "b": f"What's the capital city of {c}?", "label": True})
        rows.append(
            {"a": f"What is the capital of {c}?", "b": f"What is the capital of {countries[i - 1]}?", "label": False}
        )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    verifier = tmp_path / "verifier.json"

    def calibrate(path: Path) -> subprocess.CompletedProcess:
        # 16 equivalent pairs: right 16 times of 16, precision's 95% lower bound is 0.83 at most.
        args = ["kb", "calibrate", "--pairs", str(path), "--target-precision", "0.75", "--format", "json"]
        args += ["--write-verifier", str(verifier)]
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )

    done = calibrate(pairs)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    guarded = report["guarded"]
    assert guarded["threshold"] is not None and guarded["precision_low"] >= 0.7 and guarded["recall"] > 0.5
    assert guarded["hits"] >= 10
    assert report["recall_cost"] == pytest.approx(1 - guarded["recall"])
    # Names decide these negatives: the guarded matcher keeps more recall than a plain threshold.
    assert guarded["recall"] >= report["threshold_only"]["recall"]
    # The verifier file it wrote names the embedder its cosines came from; a policy can use it.
    from proxy.retrieval.verifier import load_verifier

    assert load_verifier(verifier).embedder == "local:all-MiniLM-L6-v2"
    assert report["verifier"]["embedder"] == "local:all-MiniLM-L6-v2" and report["verifier"]["hits"] >= 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x"}\n')
    done = calibrate(bad)
    assert done.returncode == 1 and "bad.jsonl:1" in done.stderr


def feedback(server: Server, request_id: str, rating: str, team: str | None = "alpha") -> httpx.Response:
    from tests.conftest import TEAM_KEYS

    headers = {"Authorization": f"Bearer {TEAM_KEYS[team]}"} if team else {}
    return httpx.post(
        f"{server.url}/v1/proxy/feedback", json={"request_id": request_id, "rating": rating}, headers=headers
    )


def faq_bound(server: Server) -> dict:
    status = httpx.get(f"{server.url}/admin/kb/faq", headers=ADMIN).json()["status"]
    return next(b for b in status["error_bounds"] if b["policy"] == "faq")


def test_every_phrasing_answers_with_the_one_answer_and_bad_entries_store_nothing(proxy1: Server) -> None:
    phrasings = ["How do I reset my badge PIN?", "I forgot my badge PIN, what now?", "Badge PIN reset procedure"]
    assert upsert(proxy1, "faq", [{"id": "badge", "questions": phrasings, "answer": "Ask the front desk."}]).is_success
    for q in phrasings:
        headers, reply = ask(proxy1, q)
        assert headers["x-llm-proxy-route"] == "retrieval" and "entry=badge" in headers["x-llm-proxy-retrieval"]
        assert reply.choices[0].message.content == "Ask the front desk."
    for field, value in [("source", "https://kb/x\r\nSet-Cookie: a=b"), ("tags", ["t\x07"])]:
        bad = {"id": "ctl", "questions": ["Where is the printer?"], "answer": "Room 3.", field: value}
        r = upsert(proxy1, "faq", [bad])
        assert r.status_code == 400 and "control character" in r.json()["error"]["message"]
    assert "ctl" not in listed_ids(proxy1, "faq")


def test_feedback_judges_a_hit_of_ones_own_team_once_and_a_bad_record_stops_the_collection(
    proxy1: Server, rmock: MockUpstream
) -> None:
    question = unique("What is the guest wifi password")
    assert upsert(proxy1, "faq", [{"id": "wifi-fb", "question": question, "answer": "hunter2"}]).is_success
    headers, _ = ask(proxy1, question)
    assert headers["x-llm-proxy-route"] == "retrieval"
    request_id = headers["x-llm-proxy-request-id"]
    before = faq_bound(proxy1)
    # Nobody else's verdict counts, and bad input changes nothing.
    assert feedback(proxy1, request_id, "good", team=None).status_code == 401
    assert feedback(proxy1, request_id, "good", team="beta").status_code == 403
    assert feedback(proxy1, "0" * 24, "good").status_code == 404
    assert feedback(proxy1, request_id, "meh").status_code == 400
    assert feedback(proxy1, "bad id\r\n", "good").status_code == 400
    assert faq_bound(proxy1)["served_judged"] == before["served_judged"]
    r = feedback(proxy1, request_id, "good")
    assert r.status_code == 200 and r.json()["recorded"] and r.json()["collection"] == "faq"
    assert feedback(proxy1, request_id, "bad").status_code == 409  # one verdict per request
    after = faq_bound(proxy1)
    assert after["served_judged"] == before["served_judged"] + 1 and after["served_wrong"] == before["served_wrong"]
    # Wrong, wrong: the realised error's lower bound passes 5% and the collection stops answering.
    # (An entry judged wrong at a similarity never answers there again: each verdict is on another entry.)
    n = 0
    while faq_bound(proxy1)["answering"]:
        other = unique(f"Which floor is meeting room {n} on")
        assert upsert(proxy1, "faq", [{"id": f"room-{n}", "question": other, "answer": "The third."}]).is_success
        headers, _ = ask(proxy1, other)
        assert headers["x-llm-proxy-route"] == "retrieval"
        assert feedback(proxy1, headers["x-llm-proxy-request-id"], "bad").status_code == 200
        assert ask(proxy1, other)[0]["x-llm-proxy-route"] == "upstream"  # that entry: not at that similarity
        n += 1
    assert n <= 3
    bound = faq_bound(proxy1)
    assert bound["interval"][0] > 0.05 and bound["realised_error"] > 0.05
    assert ask(proxy1, question)[0]["x-llm-proxy-route"] == "upstream"
    metrics = httpx.get(proxy1.url + "/metrics").text
    assert 'llm_proxy_retrieval_verdicts_total{collection="faq",policy="faq",verdict="bad"}' in metrics
    assert 'llm_proxy_retrieval_lookups_total{collection="faq",policy="faq",result="over_bound"}' in metrics
    # Until reload: then it answers again, its bound afresh.
    assert httpx.post(proxy1.url + "/admin/reload", headers=ADMIN).json()["reloaded"]
    wait_for(lambda: ask(proxy1, question)[0]["x-llm-proxy-route"] == "retrieval", "answers after reload")
    assert faq_bound(proxy1)["served_judged"] == 0


def test_a_borderline_hit_is_checked_by_the_verify_model_and_an_unclear_verdict_goes_upstream(
    proxy1: Server, rmock: MockUpstream
) -> None:
    stored = unique("How do I rotate my API key")
    assert upsert(proxy1, "checked", [{"id": "rotate", "question": stored, "answer": "Settings > Keys."}]).is_success
    # Exact: above the band, no check at all.
    headers, _ = ask(proxy1, stored, model="small")
    assert headers["x-llm-proxy-route"] == "retrieval" and chat_calls(rmock) == 0
    # A paraphrase inside the band: the check model is asked (the mock answers neither yes nor no), so
    # the request goes upstream: two chat calls, the check and the generation.
    headers, _ = ask(proxy1, stored.replace("How do I rotate", "How should I go about rotating"), model="small")
    assert headers["x-llm-proxy-route"] == "upstream"
    assert chat_calls(rmock) == 2
    metrics = httpx.get(proxy1.url + "/metrics").text
    assert 'llm_proxy_retrieval_lookups_total{collection="checked",policy="checked",result="llm_error"}' in metrics


def test_a_borderline_hit_the_verify_model_accepts_is_answered_from_the_kb_and_its_check_is_the_lookup_cost(
    proxy1: Server, rmock: MockUpstream
) -> None:
    from proxy.retrieval.llm_check import PROMPT

    stored = unique("How can I change the billing address on my account")
    answer = "Open Billing, then Address; " + "enter the new address as it appears on your invoices. " * 6
    assert upsert(proxy1, "checked", [{"id": "billing", "question": stored, "answer": answer}]).is_success
    rmock.configure(scripted=[[PROMPT[:40], "Yes."]])
    asked = stored.replace("How can I change", "How do I update")
    headers, reply = ask(proxy1, asked, model="small")
    assert headers["x-llm-proxy-route"] == "retrieval" and "entry=billing" in headers["x-llm-proxy-retrieval"]
    assert reply.choices[0].message.content == answer
    similarity = float(headers["x-llm-proxy-retrieval"].rsplit("=", 1)[1])
    assert 0.8 <= similarity < 0.995  # inside the band: the check ran
    assert chat_calls(rmock) == 1  # the check, and no generation
    stats = rmock.stats()
    check = stats["last_bodies"][-1]
    assert check["messages"][0]["content"] == PROMPT and asked in check["messages"][1]["content"]
    # The check's tokens at small's prices are the hit's cost (the local embedder is free); the saving is
    # the generation it replaced (a long answer: a short one on small costs less than the check) less that.
    cost, saved = float(headers["x-llm-proxy-cost-usd"]), float(headers["x-llm-proxy-saved-usd"])
    expected = (stats["prompt_tokens_served"] * 0.15 + stats["completion_tokens_served"] * 0.6) / 1e6
    assert cost == pytest.approx(expected, rel=1e-6) and cost > 0 and saved > 0
    metrics = httpx.get(proxy1.url + "/metrics").text
    assert 'llm_proxy_retrieval_lookups_total{collection="checked",policy="checked",result="hit"}' in metrics


def test_the_cost_multiple_gate_counts_the_llm_check_in_the_lookup_cost(proxy1: Server, rmock: MockUpstream) -> None:
    stored = unique("Where do I download my tax invoices")
    assert upsert(proxy1, "gated", [{"id": "tax", "question": stored, "answer": "Billing > Invoices."}]).is_success
    rmock.configure(scripted=[["cached answer may be reused", "yes"]])
    headers, _ = ask(proxy1, stored.replace("Where do I download", "Where can I get"), model="small")
    # The embedding is free, so only the check's expected cost can make the lookup not worth 50x: no check
    # was asked and the request went upstream.
    assert headers["x-llm-proxy-route"] == "upstream" and chat_calls(rmock) == 1
    metrics = httpx.get(proxy1.url + "/metrics").text
    assert 'llm_proxy_retrieval_lookups_total{collection="gated",policy="gated",result="not_worth_it"}' in metrics


def test_feedback_to_one_replica_changes_what_the_other_answers_and_reports(
    kb_proxies: list[Server], rmock: MockUpstream
) -> None:
    proxy1, proxy2 = kb_proxies
    rmock.reset()
    question = unique("Where is the parking garage entrance")
    r = upsert(proxy1, "faq", [{"id": "garage", "question": question, "answer": "On Elm Street."}])
    version = r.json()["version"]
    # Not by asking: an answer from upstream would fill the semantic cache, which answers later on its own.
    wait_for(
        lambda: httpx.get(f"{proxy2.url}/admin/kb/faq", headers=ADMIN).json()["status"]["version"] >= version,
        "the entry on the other replica",
    )
    before = [faq_bound(p) for p in kb_proxies]
    assert all(b["answering"] for b in before)
    hits = [ask(p, question)[0] for p in kb_proxies]
    assert [served_by((h, None)) for h in hits] == ["faq", "faq"]
    served_by_1, served_by_2 = (h["x-llm-proxy-request-id"] for h in hits)
    # Feedback on replica 1's answer, given to replica 2 (any replica takes it): wrong.
    r = feedback(proxy2, served_by_1, "bad")
    assert r.status_code == 200, r.text
    # Replica 1 learns it from the store: it reports the verdict and that entry no longer answers there.
    wait_for(lambda: faq_bound(proxy1)["served_wrong"] == before[0]["served_wrong"] + 1, "replica 1 to see the verdict")
    assert faq_bound(proxy1)["entries_raised"] >= before[0]["entries_raised"] + 1
    assert served_by(ask(proxy1, question)) != "faq" and served_by(ask(proxy2, question)) != "faq"
    # One verdict per request across the replicas; replica 2's answer judged on replica 1.
    assert feedback(proxy1, served_by_1, "good").status_code == 409
    assert feedback(proxy1, served_by_2, "good").status_code == 200
    wait_for(
        lambda: faq_bound(proxy2)["served_judged"] == before[1]["served_judged"] + 2, "replica 2 to see both verdicts"
    )
    assert faq_bound(proxy2)["served_wrong"] == before[1]["served_wrong"] + 1
