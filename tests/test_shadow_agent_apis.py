"""Shadow evaluation of the agent APIs through the real server, the official `openai` SDK (Responses API) and
`anthropic` SDK (Messages), streamed and not, to upstreams that speak the format and to Chat Completions ones:
the counterfactual is the client's request in its own format, to the model it asked for, not streamed and
stored nowhere (a kept conversation's history included); the judge sees the text the client received; the
judgement reaches /admin/savings; what cannot be shadowed is counted and the client's answer is untouched."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.conftest import Server, start_proxy, wait_for
from tests.test_shadow_evaluation import ADMIN, EVALUATION, metric, shadow_models

KEY = "sk-shadow-agents"
QUESTION = "Explain what a token is, for someone new to language models."
SHORT = {"mock-small": 4}  # the routed answers are 4 words, the counterfactual's 32: a `longer` judge says loss
_ANSWER = re.compile(r"\[The Start of Assistant (A|B)'s Answer\]\n(.*?)\n\[The End of", re.DOTALL)


def _policy(mock_url: str) -> str:
    up = f"api_base: {mock_url}/v1"
    return (
        shadow_models(mock_url)
        + textwrap.dedent(
            f"""\
          resp-big: {{{up}, upstream_model: mock-resp-big, api: responses,
                      price: {{input_per_mtok: 2, output_per_mtok: 8}}}}
          resp-small: {{{up}, upstream_model: mock-resp-small, api: responses,
                        price: {{input_per_mtok: 0.1, output_per_mtok: 0.4}}}}
          claude-big:
            provider: anthropic
            api_base: {mock_url}
            api_key: upstream-anthropic-key
            upstream_model: claude-big
            price: {{input_per_mtok: 3, output_per_mtok: 15}}
          embed: {{{up}, upstream_model: mock-embed, mode: embedding, price: {{input_per_mtok: 0.02}}}}
        collections:
          docs: {{kind: kb, embedder: embed}}
        teams:
          shadowed: {{keys: [{KEY}], budget: {{usd: 100, period: day}}}}
        """
        )
        + textwrap.dedent(EVALUATION).replace("  exclude_teams: [private]\n", "")
        + textwrap.dedent(
            """\
        policies:
          - name: cheap-route
            when: {headers: {x-shadow: route}}
            route: {to: small}
            shadow: {rate: 1.0}
          - name: native-route
            when: {headers: {x-shadow: native}}
            route: {to: resp-small}
            shadow: {rate: 1.0}
          - name: short-answers
            when: {headers: {x-shadow: concise}}
            concise: {instruction: "Answer in one sentence.", holdout: 0}
            shadow: {rate: 1.0}
          - name: kb-answers
            # The mock's embeddings carry no meaning: every query matches its best entry, guards off.
            when: {headers: {x-shadow: kb}}
            retrieve: {collection: docs, min_similarity: -1, min_margin: 0, decisive_tokens: false}
            shadow: {rate: 1.0}
        """
        )
    )


@pytest.fixture(scope="module")
def agents_shadow(session_tmp, mock_upstream) -> Iterator[Server]:
    server = start_proxy(session_tmp, _policy(mock_upstream.url))
    yield server
    server.stop()


def _openai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _anthropic(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def _outcomes(server: Server, policy: str) -> dict[str, float]:
    return {
        o: metric(server, "llm_proxy_shadow_judgements_total", policy=policy, outcome=o)
        for o in ("win", "tie", "loss", "unjudged")
    }


def _dropped(server: Server, policy: str, reason: str) -> float:
    return metric(server, "llm_proxy_shadow_dropped_total", policy=policy, reason=reason)


def _bodies(mock, model: str) -> list[dict]:
    return [b for b in mock.stats()["last_bodies"] if b.get("model") == model]


def _judged_answers(mock) -> list[dict[str, str]]:
    """The two answers of each judge call the mock received, by position."""
    return [dict(_ANSWER.findall(b["messages"][1]["content"])) for b in _bodies(mock, "mock-judge")]


def _expect_one_loss(server: Server, policy: str, before: dict[str, float]) -> None:
    wait_for(lambda: _outcomes(server, policy)["loss"] == before["loss"] + 1, "the judged loss")
    after = _outcomes(server, policy)
    assert sum(after.values()) == sum(before.values()) + 1  # one comparison, judged (not unjudged)


def _assert_judge_saw(mock, client_text: str, words: int = 4) -> None:
    """The judge compared the client's text with the counterfactual's (32 words), in both orders."""
    pairs = _judged_answers(mock)
    assert len(pairs) == 2
    assert sorted(p["A"] == client_text for p in pairs) == [False, True]
    assert all(client_text in (p["A"], p["B"]) for p in pairs)
    assert all(len(p["A"].split()) + len(p["B"].split()) == words + 32 for p in pairs)


def _pair(server: Server, policy: str, pair: str) -> dict:
    r = httpx.get(server.url + "/admin/savings", headers=ADMIN, timeout=10)
    r.raise_for_status()
    return r.json()["by_policy"][policy]["quality"]["by_model_pair"][pair]


# ---------------------------------------------------------------------------------------- Responses API


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["big", "resp-big"], ids=["chat-upstream", "responses-upstream"])
def test_a_routed_responses_request_is_shadowed_in_its_format_and_judged(agents_shadow, mock, model, stream):
    mock.configure(judge="longer", reply_tokens_by_model=SHORT)
    before = _outcomes(agents_shadow, "cheap-route")
    stored = httpx.get(mock.url + "/mock/agent").json()["stored_responses"]
    client = _openai(agents_shadow)
    headers = {"x-shadow": "route"}
    if stream:
        events = list(
            client.responses.create(
                model=model, input=QUESTION, max_output_tokens=64, stream=True, extra_headers=headers
            )
        )
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed" and events[-1].response.output_text == text
    else:
        raw = client.responses.with_raw_response.create(
            model=model, input=QUESTION, max_output_tokens=64, extra_headers=headers
        )
        assert raw.headers["x-llm-proxy-model"] == "small"
        text = raw.parse().output_text
    assert len(text.split()) == 4  # the routed answer, unchanged by the evaluation
    _expect_one_loss(agents_shadow, "cheap-route", before)
    _assert_judge_saw(mock, text)
    if model == "big":  # a Chat Completions upstream: the counterfactual went as chat, translated once
        (counterfactual,) = _bodies(mock, "mock-big")
        assert counterfactual["messages"] == [{"role": "user", "content": QUESTION}]
        assert "input" not in counterfactual and "stream" not in counterfactual
        assert counterfactual["max_tokens"] == 64
    else:  # the upstream speaks Responses: the client's request as it came, not streamed, not stored
        (counterfactual,) = _bodies(mock, "mock-resp-big")
        assert counterfactual["input"] == QUESTION and counterfactual["max_output_tokens"] == 64
        assert counterfactual["store"] is False and "stream" not in counterfactual and "messages" not in counterfactual
    assert httpx.get(mock.url + "/mock/agent").json()["stored_responses"] == stored
    assert _pair(agents_shadow, "cheap-route", f"small vs {model}")["losses"] >= 1


def test_a_kept_conversation_is_shadowed_with_its_history_and_nothing_is_kept_again(agents_shadow, mock):
    mock.configure(judge="longer", reply_tokens_by_model=SHORT)
    client = _openai(agents_shadow)
    first = client.responses.create(model="big", input="What is a token?", max_output_tokens=64)
    before = _outcomes(agents_shadow, "cheap-route")
    second = client.responses.create(
        model="big",
        input="And a context window?",
        instructions="You teach beginners.",
        previous_response_id=first.id,
        max_output_tokens=64,
        extra_headers={"x-shadow": "route"},
    )
    assert second.previous_response_id == first.id and len(second.output_text.split()) == 4
    _expect_one_loss(agents_shadow, "cheap-route", before)
    _assert_judge_saw(mock, second.output_text)
    # The counterfactual: the whole conversation (as the proxy expanded it for the client's request).
    counterfactual = _bodies(mock, "mock-big")[-1]
    assert counterfactual["messages"] == [
        {"role": "system", "content": "You teach beginners."},
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And a context window?"},
    ]
    question = _bodies(mock, "mock-judge")[0]["messages"][1]["content"]
    assert "What is a token?" in question and "And a context window?" in question and "You teach beginners." in question
    # The conversation continues from the client's answer: the counterfactual's was kept nowhere.
    third = client.responses.create(model="big", input="Thanks.", previous_response_id=second.id)
    history = _bodies(mock, "mock-big")[-1]["messages"]
    assert [m["content"] for m in history if m["role"] == "assistant"] == [first.output_text, second.output_text]
    assert third.previous_response_id == second.id


def test_a_concise_responses_request_is_shadowed_without_the_instruction(agents_shadow, mock):
    mock.configure(judge="tie")
    before = _outcomes(agents_shadow, "short-answers")
    _openai(agents_shadow).responses.create(
        model="resp-big", input=QUESTION, max_output_tokens=64, extra_headers={"x-shadow": "concise"}
    )
    wait_for(lambda: _outcomes(agents_shadow, "short-answers")["tie"] == before["tie"] + 1, "the judged tie")
    treated, counterfactual = _bodies(mock, "mock-resp-big")
    assert "Answer in one sentence." in treated["instructions"]
    assert "instructions" not in counterfactual and counterfactual["input"] == QUESTION
    assert _pair(agents_shadow, "short-answers", "resp-big vs resp-big")["ties"] >= 1


# ---------------------------------------------------------------------------------------- Messages API


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["big", "claude-big"], ids=["chat-upstream", "anthropic-upstream"])
def test_a_routed_messages_request_is_shadowed_in_its_format_and_judged(agents_shadow, mock, model, stream):
    mock.configure(judge="longer", reply_tokens_by_model=SHORT)
    before = _outcomes(agents_shadow, "cheap-route")
    client = _anthropic(agents_shadow)
    request = {
        "model": model,
        "max_tokens": 64,
        "system": "You teach beginners.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        # A version other than the proxy's default: the counterfactual is sent with the client's.
        "extra_headers": {"x-shadow": "route", "anthropic-version": "2024-10-22"},
    }
    if stream:
        with client.messages.stream(**request) as events:
            text = "".join(events.text_stream)
            assert events.get_final_message().content[0].text == text
    else:
        raw = client.messages.with_raw_response.create(**request)
        assert raw.headers["x-llm-proxy-model"] == "small"
        text = raw.parse().content[0].text
    assert len(text.split()) == 4
    _expect_one_loss(agents_shadow, "cheap-route", before)
    _assert_judge_saw(mock, text)
    question = _bodies(mock, "mock-judge")[0]["messages"][1]["content"]
    assert "You teach beginners." in question and QUESTION in question
    if model == "big":
        (counterfactual,) = _bodies(mock, "mock-big")
        assert counterfactual["messages"][0] == {"role": "system", "content": "You teach beginners."}
        assert "system" not in counterfactual and "stream" not in counterfactual
    else:  # Anthropic's own API: the Messages body as the client sent it, with its anthropic-version
        (counterfactual,) = _bodies(mock, "claude-big")
        assert counterfactual["system"] == "You teach beginners." and counterfactual["max_tokens"] == 64
        assert counterfactual["messages"] == request["messages"] and "stream" not in counterfactual
        seen = httpx.get(mock.url + "/mock/agent").json()["seen"]
        assert [s["anthropic-version"] for s in seen if s["path"] == "/v1/messages"][-1] == "2024-10-22"
    assert _pair(agents_shadow, "cheap-route", f"small vs {model}")["losses"] >= 1


def _store_entry(server: Server, entry_id: str, question: str, answer: str) -> None:
    """One entry in the `docs` collection, once the collection is ready to answer from it."""
    entries = [{"id": entry_id, "question": question, "answer": answer}]
    r = httpx.post(f"{server.url}/admin/kb/docs", json=entries, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: httpx.get(server.url + "/readyz").json()["collections"]["docs"]["ready"], "the kb")


def test_a_messages_request_answered_from_retrieval_is_shadowed_and_judged(agents_shadow, mock):
    mock.configure(judge="longer")
    _store_entry(agents_shadow, "reset", "How do I reset my password?", "Use the reset link.")
    before = _outcomes(agents_shadow, "kb-answers")
    with _anthropic(agents_shadow).messages.stream(
        model="claude-big",
        max_tokens=64,
        messages=[{"role": "user", "content": "How can I reset my password?"}],
        extra_headers={"x-shadow": "kb"},
    ) as events:
        text = "".join(events.text_stream)
        assert events.response.headers["x-llm-proxy-route"] == "retrieval"
    assert text == "Use the reset link."
    _expect_one_loss(agents_shadow, "kb-answers", before)  # 4 words against the counterfactual's 32
    _assert_judge_saw(mock, text)
    (counterfactual,) = _bodies(mock, "claude-big")
    assert counterfactual["messages"] == [{"role": "user", "content": "How can I reset my password?"}]
    assert _pair(agents_shadow, "kb-answers", "retrieval:docs vs claude-big")["losses"] >= 1


def test_a_responses_request_answered_from_retrieval_is_shadowed_and_judged(agents_shadow, mock):
    mock.configure(judge="longer")
    _store_entry(agents_shadow, "hours", "When is the office open?", "From nine to five.")
    before = _outcomes(agents_shadow, "kb-answers")
    try:  # the same question: an exact hit, whatever the mock's meaningless embeddings say
        raw = _openai(agents_shadow).responses.with_raw_response.create(
            model="resp-big", input="When is the office open?", extra_headers={"x-shadow": "kb"}
        )
    finally:  # the module's other retrieval test matches by nearest entry: leave it only its own
        httpx.delete(f"{agents_shadow.url}/admin/kb/docs/hours", headers=ADMIN, timeout=30).raise_for_status()
    assert raw.headers["x-llm-proxy-route"] == "retrieval"
    text = raw.parse().output_text
    assert text == "From nine to five."
    _expect_one_loss(agents_shadow, "kb-answers", before)  # 4 words against the counterfactual's 32
    _assert_judge_saw(mock, text)
    (counterfactual,) = _bodies(mock, "mock-resp-big")  # in the Responses format, to the model asked for
    assert counterfactual["input"] == "When is the office open?" and counterfactual["store"] is False
    assert _pair(agents_shadow, "kb-answers", "retrieval:docs vs resp-big")["losses"] >= 1


# ----------------------------------------------------------------------------------------- bad input


def test_a_failed_counterfactual_of_a_messages_request_is_counted_and_the_client_untouched(agents_shadow, mock):
    mock.configure(judge="tie")
    mock.fault(status=500, model="claude-big", count=1)
    dropped = _dropped(agents_shadow, "cheap-route", "shadow_error")
    before = _outcomes(agents_shadow, "cheap-route")
    message = _anthropic(agents_shadow).messages.create(
        model="claude-big",
        max_tokens=64,
        messages=[{"role": "user", "content": QUESTION}],
        extra_headers={"x-shadow": "route"},
    )
    assert len(message.content[0].text.split()) == 32
    wait_for(lambda: _dropped(agents_shadow, "cheap-route", "shadow_error") == dropped + 1, "the dropped shadow")
    assert _outcomes(agents_shadow, "cheap-route") == before
    assert not _bodies(mock, "mock-judge")  # nothing to judge: no judge spend
    r = httpx.get(agents_shadow.url + "/admin/savings", headers=ADMIN, timeout=10)
    assert r.json()["measurement"]["today"]["reserved_usd"] == 0


def test_a_counterfactual_no_chat_upstream_can_take_is_counted_not_sent(agents_shadow, mock):
    """A Responses request continuing a response only a Responses upstream knows, routed to one, whose
    requested model speaks only chat: its counterfactual cannot be sent, and is counted."""
    client = _openai(agents_shadow)
    first = client.responses.create(model="resp-small", input="What is a token?", max_output_tokens=64)
    dropped = _dropped(agents_shadow, "native-route", "untranslatable")
    second = client.responses.with_raw_response.create(
        model="big",
        input="And a context window?",
        previous_response_id=first.id,
        max_output_tokens=64,
        extra_headers={"x-shadow": "native"},
    )
    assert second.headers["x-llm-proxy-model"] == "resp-small" and second.parse().output_text
    wait_for(lambda: _dropped(agents_shadow, "native-route", "untranslatable") == dropped + 1, "the counted skip")
    assert not _bodies(mock, "mock-big") and not _bodies(mock, "mock-judge")
    r = httpx.get(agents_shadow.url + "/admin/savings", headers=ADMIN, timeout=10)
    assert r.json()["measurement"]["today"]["reserved_usd"] == 0
