"""The parts of shadow evaluation that need no server: the judge's verdict parser and the two-order rule,
the checks without a judge, judgements in both stores, the policy file's `evaluation:` and `shadow:` checks,
the counterfactual's body and the judge's question in each format."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest

from proxy.config import parse_policy_text
from proxy.config.loader import ConfigError
from proxy.services.evaluation import ShadowJob, counterfactual_body, question_text
from proxy.services.judging import (
    LOSS,
    TIE,
    UNJUDGED,
    WIN,
    combine_orders,
    compare_exact,
    compare_json,
    compare_number,
    final_number,
    judge_messages,
    parse_verdict,
)
from proxy.store.memory import MemoryStore
from proxy.wire.adapter import Endpoint
from proxy.wire.formats import BY_ENDPOINT
from tests.conftest import REDIS_URL, ROOT, private_redis_keys


def _job(endpoint: str, body: dict) -> ShadowJob:
    return ShadowJob("p", "judge", "t", "small", "big", body, "answer", endpoint=endpoint)


def test_the_counterfactual_is_the_clients_request_to_the_model_it_asked_for_unstreamed_and_unstored():
    responses = {"model": "small", "input": "Hi", "stream": True, "background": True, "store": True, "top_p": 0.5}
    assert counterfactual_body(_job(Endpoint.RESPONSES, responses)) == {
        "model": "big",
        "input": "Hi",
        "store": False,  # the Responses API stores by default
        "top_p": 0.5,
    }
    messages = {"model": "small", "max_tokens": 9, "system": "S", "messages": [], "stream": True}
    assert counterfactual_body(_job(Endpoint.MESSAGES, messages)) == {
        "model": "big",
        "max_tokens": 9,
        "system": "S",
        "messages": [],
    }
    chat = {"model": "small", "messages": [], "stream": True, "stream_options": {}, "n": 2, "store": True}
    assert counterfactual_body(_job(Endpoint.CHAT, chat)) == {"model": "big", "messages": []}


def test_the_judge_reads_each_formats_request_as_a_conversation():
    responses = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Q?"}]}], "instructions": "I."}
    assert question_text(BY_ENDPOINT[Endpoint.RESPONSES], responses) == "system: I.\nuser: Q?"
    messages = {
        "max_tokens": 5,
        "system": "S.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Q?"}]}],
    }
    assert question_text(BY_ENDPOINT[Endpoint.MESSAGES], messages) == "system: S.\nuser: Q?"
    # A response id only its upstream knows has no chat form: the judge reads the new input alone.
    continued = {"input": "And then?", "previous_response_id": "resp_upstream"}
    assert question_text(BY_ENDPOINT[Endpoint.RESPONSES], continued) == "And then?"
    assert question_text(BY_ENDPOINT[Endpoint.CHAT], {"messages": [{"role": "user", "content": "Q?"}]}) == "Q?"


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Assistant A is more accurate. [[A]]", "A"),
        ("[[b]]", "B"),
        ("Both are equally good. [[C]]", "tie"),
        ("[[TIE]]", "tie"),
        # a judge that restates the format first: its own verdict comes last
        ('Output "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie. My verdict: [[B]]', "B"),
        ("Final verdict: **B**", "B"),
        ("The better answer is Assistant A.", "A"),
        ("  A.  ", "A"),
        ("tie", "tie"),
        ("I cannot decide; both have merits.", None),
        ("", None),
        ("Answer B mentions a detail but I will not choose.", None),
    ],
)
def test_the_verdict_parser_reads_what_judges_write_and_nothing_else(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_both_orders_cancel_position_bias():
    # the policy's answer is A in the first call, B in the second
    assert combine_orders("A", "B") == WIN
    assert combine_orders("B", "A") == LOSS
    assert combine_orders("tie", "tie") == TIE
    assert combine_orders("A", "A") == TIE  # the judge always picked the first position: no preference
    assert combine_orders("A", "tie") == TIE
    assert combine_orders(None, "B") == UNJUDGED and combine_orders("A", None) == UNJUDGED


def test_the_judge_prompt_carries_both_answers_in_their_places():
    system, user = judge_messages("What is 2+2?", "four", "4")
    assert "[[A]]" in system["content"] and "[[C]]" in system["content"]
    text = user["content"]
    assert text.index("What is 2+2?") < text.index("four") < text.index("[The Start of Assistant B's Answer]\n4")


def test_checks_without_a_judge():
    assert compare_exact("  Paris ", "paris") == TIE
    assert compare_exact("Lyon", "Paris") == LOSS
    assert compare_exact("Paris", "   ") == UNJUDGED
    assert compare_json('```json\n{"a": [1, 2]}\n```', '{"a":[1,2]}') == TIE
    assert compare_json('{"a": 1}', '{"a": 2}') == LOSS
    assert compare_json("not json", '{"a": 1}') == LOSS
    assert compare_json('{"a": 1}', "the reference is prose") == UNJUDGED
    assert final_number("Step 1: 3 apples... so the answer is 1,234.5 apples.") == 1234.5
    assert final_number(r"We get \boxed{42} after checking 7 cases") == 42
    assert final_number("no digits here") is None
    assert compare_number("... = 18", "Janet makes $18 every day. #### 18") == TIE
    assert compare_number("It is 17", "#### 18") == LOSS
    assert compare_number("no idea", "#### 18") == LOSS
    assert compare_number("18", "I can't work it out") == UNJUDGED


async def _judgements_round_trip(store) -> None:
    for outcome in ("win", "tie", "tie", "loss", "unjudged"):
        await store.record_judgement("route-a", "small vs big", "2026-12-01", outcome)
    await store.record_judgement("route-a", "small vs big", "2026-12-02", "loss")
    await store.record_judgement("route-a", "tiny vs big", "2026-12-02", "win")
    await store.record_judgement("route-b", "small vs big", "2026-12-02", "tie")
    got = await store.judgements(["route-a", "route-b", "route-c"], ["2026-12-02", "2026-12-01"])
    a = {k: (c.win, c.tie, c.loss, c.unjudged) for k, c in got["route-a"].items()}
    assert a == {
        ("2026-12-01", "small vs big"): (1, 2, 1, 1),
        ("2026-12-02", "small vs big"): (0, 0, 1, 0),
        ("2026-12-02", "tiny vs big"): (1, 0, 0, 0),
    }
    assert {k: c.tie for k, c in got["route-b"].items()} == {("2026-12-02", "small vs big"): 1}
    assert got["route-c"] == {}
    only_one_day = await store.judgements(["route-a"], ["2026-12-01"])
    assert set(only_one_day["route-a"]) == {("2026-12-01", "small vs big")}


async def test_judgements_per_policy_pair_and_day_in_memory():
    await _judgements_round_trip(MemoryStore())


async def test_judgements_per_policy_pair_and_day_in_redis():
    from proxy.config.models import StoreConfig
    from proxy.store.redis import RedisStore

    with private_redis_keys(f"llmpjudge{uuid.uuid4().hex[:8]}") as prefix:
        store = RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix))
        try:
            await _judgements_round_trip(store)
            # a write replayed from the fail-open journal with the same write id counts once
            await store.record_judgement("route-b", "small vs big", "2026-12-02", "tie", write_id="1:x")
            await store.record_judgement("route-b", "small vs big", "2026-12-02", "tie", write_id="1:x")
            got = await store.judgements(["route-b"], ["2026-12-02"])
            assert got["route-b"][("2026-12-02", "small vs big")].tie == 2
            keys = [k.decode() async for k in store.client.scan_iter(f"{prefix}:*shadow*")]
            assert keys and all("{p:" in k for k in keys)  # one hash tag per policy: Cluster-safe
        finally:
            await store.close()


BASE = """\
version: 1
models:
  big: {api_base: "http://127.0.0.1:9/v1", price: {input_per_mtok: 2.5, output_per_mtok: 10}}
  small: {api_base: "http://127.0.0.1:9/v1", price: {input_per_mtok: 0.15, output_per_mtok: 0.6}}
  embed: {api_base: "http://127.0.0.1:9/v1", mode: embedding, price: {input_per_mtok: 0.02}}
teams:
  a: {keys: [k1]}
"""


def _errors(extra: str) -> list[str]:
    try:
        parse_policy_text(BASE + textwrap.dedent(extra), "p.yaml")
    except ConfigError as e:
        return [str(i) for i in e.issues]
    return []


def test_a_valid_evaluation_block_loads():
    assert not _errors(
        """\
        evaluation: {judge: big, budget_usd_per_day: 2, queue: 10, exclude_teams: [a]}
        policies:
          - name: r
            route: {to: small}
            shadow: {rate: 0.05}
            min_quality: 0.93
            min_samples: 50
          - name: c
            concise: {}
            shadow: {rate: 0.02, compare: number}
        """
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "policies:\n  - name: r\n    route: {to: small}\n    shadow: {rate: 0.1}\n",
            "p.yaml:11: policies[0].shadow: shadow evaluation needs an `evaluation:` block",
        ),
        (
            "evaluation: {budget_usd_per_day: 1}\npolicies:\n  - name: r\n    route: {to: small}\n"
            "    shadow: {rate: 0.1}\n",
            "p.yaml:12: policies[0].shadow.compare: compare: judge needs evaluation.judge",
        ),
        ("evaluation: {judge: gpt-9}\n", "p.yaml:8: evaluation.judge: unknown model 'gpt-9'"),
        ("evaluation: {judge: embed}\n", "p.yaml:8: evaluation.judge: model 'embed' is not a chat model"),
        ("evaluation: {exclude_teams: [zz]}\n", "p.yaml:8: evaluation.exclude_teams[0]: unknown team 'zz'"),
        (
            "evaluation: {}\npolicies:\n  - name: s\n    set: {max_tokens: {max: 5}}\n    shadow: {rate: 0.1}\n",
            "p.yaml:10: policies[0]: Value error, shadow evaluation measures cost policies",
        ),
        (
            "policies:\n  - name: r\n    route: {to: small}\n    min_quality: 0.9\n",
            "p.yaml:9: policies[0]: Value error, min_quality needs shadow",
        ),
        (
            "evaluation: {}\npolicies:\n  - name: r\n    route: {to: small}\n    shadow: {rate: 0, compare: exact}\n",
            "p.yaml:12: policies[0].shadow.rate: Input should be greater than 0",
        ),
    ],
)
def test_check_names_the_line_of_each_evaluation_error(extra, expected):
    errors = _errors(extra)
    assert any(e.startswith(expected) for e in errors), errors


def test_check_cli_exits_1_on_a_shadow_without_evaluation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "policies:\n  - name: r\n    route: {to: small}\n    shadow: {rate: 0.1}\n")
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert f"{bad}:11: policies[0].shadow: shadow evaluation needs an `evaluation:` block" in r.stderr
