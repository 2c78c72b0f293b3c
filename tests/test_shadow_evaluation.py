"""Shadow evaluation through the real server, the openai SDK and the mock upstream in its judging mode:
the shadow call is made only after the client has its whole answer, judged results reach /admin/savings
with their intervals, measurement spend is bounded and kept apart from team spend, the quality floor stops
a policy whose answers lose (until a reload), and a judge or shadow call that fails changes nothing for
the client and is counted."""

from __future__ import annotations

import re
import textwrap
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY, REDIS_URL, Server, private_redis_keys, start_proxy, wait_for

KEY = "sk-shadow-test"
OTHER_KEY = "sk-shadow-excluded"
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
QUESTION = [{"role": "user", "content": "Explain what a token is, for someone new to language models."}]


def shadow_models(mock_url: str) -> str:
    """The head of a shadow test's policy: no retries, and `big`, `small` and `judge` on the mock (more
    models may follow, indented two spaces)."""
    up = f"api_base: {mock_url}/v1"
    return textwrap.dedent(
        f"""\
        version: 1
        retries: {{max_attempts: 1, max_total_s: 5, initial_backoff_s: 0.01, max_backoff_s: 0.02}}
        models:
          big: {{{up}, upstream_model: mock-big, price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
          small: {{{up}, upstream_model: mock-small, price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}
          judge: {{{up}, upstream_model: mock-judge, price: {{input_per_mtok: 1, output_per_mtok: 4}}}}
        """
    )


def _policy(mock_url: str, evaluation: str, extra: str = "") -> str:
    return (
        shadow_models(mock_url)
        + textwrap.dedent(
            f"""\
            teams:
              shadowed: {{keys: [{KEY}], budget: {{usd: 100, period: day}}}}
              private: {{keys: [{OTHER_KEY}]}}
            """
        )
        + textwrap.dedent(evaluation)
        + textwrap.dedent(
            """\
            policies:
              - name: cheap-route
                when: {headers: {x-shadow: route}}
                route: {to: small}
                shadow: {rate: 1.0}
              - name: floored-route
                when: {headers: {x-shadow: floor}}
                route: {to: small}
                shadow: {rate: 1.0}
                min_quality: 0.9
                min_samples: 5
              - name: exact-route
                when: {headers: {x-shadow: exact}}
                route: {to: small}
                shadow: {rate: 1.0, compare: exact}
            """
        )
        + textwrap.dedent(extra)
    )


EVALUATION = """\
evaluation:
  judge: judge
  budget_usd_per_day: 10
  queue: 64
  workers: 1
  timeout_s: 1.5
  exclude_teams: [private]
"""


@pytest.fixture(scope="module")
def shadow_proxy(session_tmp, mock_upstream) -> Iterator[Server]:
    server = start_proxy(session_tmp, _policy(mock_upstream.url, EVALUATION))
    yield server
    server.stop()


def _client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _ask(server: Server, policy: str, text: str | None = None, key: str = KEY, **kw):
    messages = [{"role": "user", "content": text}] if text else QUESTION
    return _client(server, key).chat.completions.with_raw_response.create(
        model="big", messages=messages, max_tokens=64, extra_headers={"x-shadow": policy}, **kw
    )


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of a metric's series whose labels include `labels`, read off /metrics."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _savings(server: Server) -> dict:
    r = httpx.get(server.url + "/admin/savings", headers=ADMIN, timeout=10)
    r.raise_for_status()
    return r.json()


def _judged(server: Server, policy: str) -> float:
    return sum(
        metric(server, "llm_proxy_shadow_judgements_total", policy=policy, outcome=o)
        for o in ("win", "tie", "loss", "unjudged")
    )


def _upstream_models(mock) -> list[str]:
    return [b.get("model") for b in mock.stats()["last_bodies"]]


def test_the_shadow_call_is_made_after_the_client_has_its_whole_answer(shadow_proxy, mock):
    mock.configure(judge="tie")
    before = _judged(shadow_proxy, "cheap-route")
    # The client's (routed) stream is held part-way: its response is not complete until the release.
    mock.fault(hold_after_chunks=2, model="mock-small")
    stream = _client(shadow_proxy).chat.completions.create(
        model="big", messages=QUESTION, max_tokens=64, stream=True, extra_headers={"x-shadow": "route"}
    )
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.content
    wait_for(lambda: mock.stats()["held"] == 1, "the client's stream to be held")
    # A marker in the mock's call log, made while the client's response is still incomplete.
    httpx.post(mock.url + "/v1/chat/completions", json={"model": "marker", "messages": QUESTION}).raise_for_status()
    httpx.post(mock.url + "/mock/release").raise_for_status()
    text = first.choices[0].delta.content + "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 32  # the client got its whole answer, untouched by the evaluation
    wait_for(lambda: _judged(shadow_proxy, "cheap-route") == before + 1, "the shadow comparison")
    calls = _upstream_models(mock)
    # client's call, then the marker (client still waiting), then the counterfactual, then two judge calls
    assert calls[:2] == ["mock-small", "marker"], calls
    assert calls[2] == "mock-big" and calls[3:] == ["mock-judge", "mock-judge"], calls
    counterfactual = mock.stats()["last_bodies"][2]
    assert counterfactual["messages"] == QUESTION and "stream" not in counterfactual


def test_judged_results_reach_admin_savings_with_intervals(shadow_proxy, mock):
    mock.configure(judge="tie")
    before = _judged(shadow_proxy, "cheap-route")
    for i in range(6):
        raw = _ask(shadow_proxy, "route", f"Question {i} for the judge: what is a context window?")
        assert raw.headers["x-llm-proxy-model"] == "small"
    wait_for(lambda: _judged(shadow_proxy, "cheap-route") >= before + 6, "six judgements")
    quality = _savings(shadow_proxy)["by_policy"]["cheap-route"]["quality"]
    assert quality["judged"] >= 6 and quality["ties"] == quality["judged"] and quality["losses"] == 0
    assert quality["quality_retained"] == 1.0
    low, high = quality["ci95"]
    assert 0.5 < low < 1.0 and high == 1.0  # Wilson: n ties of n is not proof of perfection
    assert quality["by_model_pair"]["small vs big"]["judged"] == quality["judged"]
    assert metric(shadow_proxy, "llm_proxy_shadow_quality_retained", policy="cheap-route", bound="estimate") == 1.0
    saving = _savings(shadow_proxy)["by_policy"]["cheap-route"]
    assert saving["saved_usd"] > 0 and saving["requests"] >= 6  # the saving, with its quality beside it


def test_measurement_spend_is_recorded_apart_from_team_spend(shadow_proxy, mock):
    mock.configure(judge="tie")
    before = _judged(shadow_proxy, "cheap-route")
    _ask(shadow_proxy, "route", "A question whose measurement is priced.")
    wait_for(lambda: _judged(shadow_proxy, "cheap-route") == before + 1, "a judgement")
    report = _savings(shadow_proxy)
    measured = report["measurement"]
    assert measured["spend_usd"] > 0 and set(measured["by_model"]) == {"big", "judge"}
    assert measured["today"]["spent_usd"] == pytest.approx(measured["spend_usd"])
    assert measured["today"]["reserved_usd"] == 0  # every reservation settled
    assert "__measurement__" not in report["by_team"]
    team = httpx.get(shadow_proxy.url + "/admin/spend", headers=ADMIN).json()["teams"]["shadowed"]
    assert set(team["by_model"]) == {"small"}  # the team paid only for the answers it got
    assert team["budget"]["spent_usd"] == pytest.approx(team["spend_usd"])
    spent = metric(shadow_proxy, "llm_proxy_shadow_spend_usd_total")
    assert spent == pytest.approx(measured["spend_usd"], rel=1e-6)


def test_an_excluded_team_is_never_shadowed(shadow_proxy, mock):
    before = _judged(shadow_proxy, "cheap-route")
    _ask(shadow_proxy, "route", "Private question.", key=OTHER_KEY)
    _ask(shadow_proxy, "route", "Shadowed question.")  # a later request that is: its job queues after
    wait_for(lambda: _judged(shadow_proxy, "cheap-route") == before + 1, "the one judgement")
    sent = [b for b in mock.stats()["last_bodies"] if b.get("model") == "mock-big"]
    assert [b["messages"][0]["content"] for b in sent] == ["Shadowed question."]


def test_exact_compare_counts_a_shorter_answer_as_a_loss_without_a_judge(shadow_proxy, mock):
    mock.configure(reply_tokens_by_model={"mock-small": 4})
    before = metric(shadow_proxy, "llm_proxy_shadow_judgements_total", policy="exact-route", outcome="loss")
    raw = _ask(shadow_proxy, "exact", "Exact question.")
    assert len(raw.parse().choices[0].message.content.split()) == 4
    wait_for(
        lambda: (
            metric(shadow_proxy, "llm_proxy_shadow_judgements_total", policy="exact-route", outcome="loss")
            == before + 1
        ),
        "an exact-compare loss",
    )
    assert "mock-judge" not in _upstream_models(mock)


def test_the_floor_stops_a_policy_whose_answers_lose_until_a_reload(shadow_proxy, mock):
    mock.configure(judge="longer", reply_tokens_by_model={"mock-small": 4})  # the cheap answers lose
    for i in range(5):
        raw = _ask(shadow_proxy, "floor", f"Floor question {i}.")
        assert raw.headers["x-llm-proxy-model"] == "small"
    wait_for(lambda: metric(shadow_proxy, "llm_proxy_shadow_policy_stopped", policy="floored-route") == 1, "the stop")
    assert metric(shadow_proxy, "llm_proxy_shadow_judgements_total", policy="floored-route", outcome="loss") == 5
    raw = _ask(shadow_proxy, "floor", "After the stop.")
    assert raw.headers["x-llm-proxy-model"] == "big" and "x-llm-proxy-policies" not in raw.headers
    quality = _savings(shadow_proxy)["by_policy"]["floored-route"]["quality"]
    assert quality["losses"] == 5 and quality["quality_retained"] == 0.0
    floor = quality["floor"]
    assert floor["stopped"] is True and floor["stopped_at"]["judged"] == 5 and floor["stopped_at"]["ci95"][1] < 0.9
    assert "policy floored-route stopped" in shadow_proxy.log() and "acts again after a reload" in shadow_proxy.log()
    assert QUESTION[0]["content"] not in shadow_proxy.log() and "Floor question" not in shadow_proxy.log()
    # Other policies keep acting.
    judged = _judged(shadow_proxy, "cheap-route")
    assert _ask(shadow_proxy, "route", "Still routed?").headers["x-llm-proxy-model"] == "small"
    wait_for(lambda: _judged(shadow_proxy, "cheap-route") == judged + 1, "its judgement")
    r = httpx.post(shadow_proxy.url + "/admin/reload", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    assert metric(shadow_proxy, "llm_proxy_shadow_policy_stopped", policy="floored-route") == 0
    assert _ask(shadow_proxy, "floor", "After the reload.").headers["x-llm-proxy-model"] == "small"
    # Its sixth loss stops it again: the judgements are kept, only the stop was lifted.
    wait_for(lambda: metric(shadow_proxy, "llm_proxy_shadow_policy_stopped", policy="floored-route") == 1, "the stop")


def test_a_stop_by_the_floor_on_one_replica_stops_the_policy_on_the_others(session_tmp, mock_upstream):
    mock_upstream.reset()
    mock_upstream.configure(judge="longer", reply_tokens_by_model={"mock-small": 4})  # the cheap answers lose
    with private_redis_keys(f"llmpfloor{uuid.uuid4().hex[:8]}") as prefix:
        evaluation = EVALUATION + "  floor_refresh_s: 0.2\n"
        policy = _policy(mock_upstream.url, evaluation, f"store: {{key_prefix: {prefix}}}\n")
        one, two = (start_proxy(session_tmp, policy, REDIS_URL) for _ in range(2))
        try:
            assert _ask(two, "floor", "Before the stop.").headers["x-llm-proxy-model"] == "small"
            for i in range(4):  # with the loss judged on `two`, the fifth: the judgements are shared
                assert _ask(one, "floor", f"Replica question {i}.").headers["x-llm-proxy-model"] == "small"
            wait_for(lambda: metric(one, "llm_proxy_shadow_policy_stopped", policy="floored-route") == 1, "the stop")
            wait_for(
                lambda: metric(two, "llm_proxy_shadow_policy_stopped", policy="floored-route") == 1,
                "the other replica to follow the stop",
            )
            raw = _ask(two, "floor", "After the stop, on the other replica.")
            assert raw.headers["x-llm-proxy-model"] == "big" and "x-llm-proxy-policies" not in raw.headers
            floor = _savings(two)["by_policy"]["floored-route"]["quality"]["floor"]
            assert floor["stopped"] is True and floor["stopped_at"]["ci95"][1] < 0.9
            assert "policy floored-route stopped (seen by another replica)" in two.log()
            assert "Replica question" not in two.log() and "Replica question" not in one.log()
            # A reload lifts the stop where it runs (its runtime started after the stop); the other keeps it.
            r = httpx.post(two.url + "/admin/reload", headers=ADMIN, timeout=30)
            assert r.status_code == 200, r.text
            assert _ask(two, "floor", "After the reload.").headers["x-llm-proxy-model"] == "small"
            assert _ask(one, "floor", "Still stopped here.").headers["x-llm-proxy-model"] == "big"
        finally:
            one.stop()
            two.stop()


@pytest.mark.parametrize(
    ("setup", "kind"),
    [
        ({"judge": "garbage"}, "unparseable"),
        ({"fault": {"status": 500, "model": "mock-judge", "count": 2}}, "error"),
        ({"fault": {"stall_s": 3, "model": "mock-judge", "count": 2}}, "timeout"),
    ],
    ids=["garbage", "error", "timeout"],
)
def test_a_judge_without_a_verdict_leaves_the_pair_unjudged_and_the_client_untouched(shadow_proxy, mock, setup, kind):
    mock.configure(judge=setup.get("judge", "tie"))
    if "fault" in setup:
        mock.fault(**setup["fault"])
    unjudged = metric(shadow_proxy, "llm_proxy_shadow_judgements_total", policy="cheap-route", outcome="unjudged")
    errors = metric(shadow_proxy, "llm_proxy_shadow_judge_errors_total", model="judge", kind=kind)
    raw = _ask(shadow_proxy, "route", f"Judge trouble: {kind}.")
    assert raw.http_response.status_code == 200 and raw.headers["x-llm-proxy-model"] == "small"
    assert len(raw.parse().choices[0].message.content.split()) == 32
    wait_for(
        lambda: (
            metric(shadow_proxy, "llm_proxy_shadow_judgements_total", policy="cheap-route", outcome="unjudged")
            == unjudged + 1
        ),
        "an unjudged pair",
    )
    assert metric(shadow_proxy, "llm_proxy_shadow_judge_errors_total", model="judge", kind=kind) == errors + 2
    assert httpx.get(shadow_proxy.url + "/healthz").status_code == 200
    assert _savings(shadow_proxy)["by_policy"]["cheap-route"]["quality"]["unjudged"] >= 1


def test_a_failed_shadow_call_is_counted_and_changes_nothing(shadow_proxy, mock):
    mock.configure(judge="tie")
    mock.fault(status=500, model="mock-big", count=1)
    dropped = metric(shadow_proxy, "llm_proxy_shadow_dropped_total", policy="cheap-route", reason="shadow_error")
    judged = _judged(shadow_proxy, "cheap-route")
    raw = _ask(shadow_proxy, "route", "The counterfactual fails.")
    assert raw.http_response.status_code == 200
    wait_for(
        lambda: (
            metric(shadow_proxy, "llm_proxy_shadow_dropped_total", policy="cheap-route", reason="shadow_error")
            == dropped + 1
        ),
        "the dropped shadow",
    )
    assert _judged(shadow_proxy, "cheap-route") == judged
    assert "mock-judge" not in _upstream_models(mock)  # nothing to judge: no judge spend
    assert _savings(shadow_proxy)["measurement"]["today"]["reserved_usd"] == 0


# ------------------------------------------------------------------- bounded: budget and queue


def test_the_measurement_budget_bounds_shadow_spend_shared_through_redis(session_tmp, mock_upstream):
    mock_upstream.reset()
    mock_upstream.configure(judge="tie")
    with private_redis_keys(f"llmpshadow{uuid.uuid4().hex[:8]}") as prefix:
        # A measurement reserves its worst case (~0.0054: 64 output tokens of big, two judge calls of up to
        # 512 tokens) and spends ~0.0011: this budget affords a few of the six, not all.
        budget = 0.008
        evaluation = EVALUATION.replace("budget_usd_per_day: 10", f"budget_usd_per_day: {budget}")
        server = start_proxy(
            session_tmp, _policy(mock_upstream.url, evaluation, f"store: {{key_prefix: {prefix}}}\n"), REDIS_URL
        )
        try:
            for i in range(6):
                raw = _ask(server, "route", f"Budgeted question {i}.")
                assert raw.http_response.status_code == 200 and raw.headers["x-llm-proxy-model"] == "small"

            def done() -> float:
                dropped = metric(server, "llm_proxy_shadow_dropped_total", policy="cheap-route", reason="budget")
                return _judged(server, "cheap-route") + dropped

            wait_for(lambda: done() == 6, "six measurements judged or refused")
            judged = _judged(server, "cheap-route")
            assert 1 <= judged < 6
            measured = _savings(server)["measurement"]
            assert measured["spend_usd"] <= budget and measured["today"]["spent_usd"] <= budget
            assert measured["today"]["reserved_usd"] == 0
            assert _savings(server)["by_policy"]["cheap-route"]["quality"]["judged"] == judged  # read from Redis
        finally:
            server.stop()


def test_a_full_queue_drops_and_counts_new_measurements(session_tmp, mock_upstream):
    mock_upstream.reset()
    mock_upstream.configure(judge="tie")
    evaluation = EVALUATION.replace("queue: 64", "queue: 1").replace("timeout_s: 1.5", "timeout_s: 30")
    server = start_proxy(session_tmp, _policy(mock_upstream.url, evaluation))
    try:
        mock_upstream.fault(hold=True, model="mock-big")  # the first counterfactual waits: the worker is busy
        _ask(server, "route", "First.")
        wait_for(lambda: mock_upstream.stats()["held"] == 1, "the first shadow call to be held")
        for i in range(3):  # one waits in the queue, two find it full
            raw = _ask(server, "route", f"Queued {i}.")
            assert raw.http_response.status_code == 200
        assert metric(server, "llm_proxy_shadow_dropped_total", policy="cheap-route", reason="queue_full") == 2
        assert metric(server, "llm_proxy_shadow_queue_depth") == 1
        httpx.post(mock_upstream.url + "/mock/release").raise_for_status()
        wait_for(lambda: _judged(server, "cheap-route") == 2, "the held and the queued measurement")
        assert metric(server, "llm_proxy_shadow_queue_depth") == 0
    finally:
        server.stop()
        mock_upstream.reset()
