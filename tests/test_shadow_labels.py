"""Closing the loop: a team that opts in (`teams.T.retain_prompts: {ttl}`) has the prompts of its judged shadow
samples kept, until their TTL, as labels; `router fit --from-store` fits a router from them and a proxy loaded
with it routes by its prediction. Through the real server, the openai SDK, the mock upstream's deterministic
judge and the real Redis. A team that did not opt in has no prompt text stored anywhere; labels expire in
Redis and in memory; bad retention settings and stores without enough labels get clear errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from proxy.config import ConfigError, load_policy_file
from proxy.config.models import StoreConfig
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    ROOT,
    delete_redis_keys,
    private_redis_keys,
    start_proxy,
    wait_for,
)
from tests.test_learned_router import CAPITALS, _algebra, _trivia
from tests.test_shadow_evaluation import metric

LEARNER_KEY = "sk-labels-learner"
PRIVATE_KEY = "sk-labels-private"
FLEETING_KEY = "sk-labels-fleeting"
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
HARD = "Solve for x"  # the mock's judge lets the strong model win on these questions only

pytestmark = pytest.mark.timeout(900)  # the CLI and the proxy each load MiniLM on a loaded 2-core machine


def _policy(mock_url: str, prefix: str, policies: str, retain: str = "{ttl: 1h}") -> str:
    up = f"api_base: {mock_url}/v1"
    return textwrap.dedent(
        f"""\
        version: 1
        retries: {{max_attempts: 1, max_total_s: 5, initial_backoff_s: 0.01, max_backoff_s: 0.02}}
        store: {{key_prefix: {prefix}}}
        models:
          big: {{{up}, upstream_model: mock-big, price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
          small: {{{up}, upstream_model: mock-small, price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}
          judge: {{{up}, upstream_model: mock-judge, price: {{input_per_mtok: 1, output_per_mtok: 4}}}}
        teams:
          learners: {{keys: [{LEARNER_KEY}], retain_prompts: {retain}}}
          private: {{keys: [{PRIVATE_KEY}]}}
          fleeting: {{keys: [{FLEETING_KEY}], retain_prompts: {{ttl: 3s}}}}
        evaluation: {{judge: judge, budget_usd_per_day: 10, queue: 256, workers: 2}}
        """
    ) + textwrap.dedent(policies)


EXPLORE = """\
policies:
  - name: explore
    when: {models: [big]}
    route: {to: small}
    shadow: {rate: 1.0}
"""


def _learned(router: Path) -> str:
    return f"""\
policies:
  - name: explore
    when: {{models: [big], headers: {{x-explore: "1"}}}}
    route: {{to: small}}
    shadow: {{rate: 1.0}}
  - name: learned-small
    when: {{models: [big]}}
    route: {{to: small, learned: {{router: {router}}}}}
"""


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**full, **(env or {})},
    )


def _chat(server, key: str, text: str) -> httpx.Response:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "big", "messages": [{"role": "user", "content": text}], "max_tokens": 64},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r


def _judged(server, policy: str = "explore") -> float:
    return sum(
        metric(server, "llm_proxy_shadow_judgements_total", policy=policy, outcome=o)
        for o in ("win", "tie", "loss", "unjudged")
    )


def _export(server, policy: str = "explore") -> list[dict]:
    r = httpx.get(server.url + "/admin/shadow/labels", params={"policy": policy}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def _everything_stored(prefix: str) -> str:
    """Every key and value under the prefix, as one text (whatever the type)."""
    client = redis.Redis.from_url(REDIS_URL)
    parts = []
    try:
        for key in client.scan_iter(f"{prefix}*", count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            else:
                value = kind
            parts.append(f"{key!r} {value!r}")
    finally:
        client.close()
    return "\n".join(parts)


def test_judged_traffic_fits_a_router_from_the_store_that_then_routes_by_its_prediction(
    session_tmp, mock_upstream, tmp_path
):
    mock_upstream.reset()
    # Deterministic judge: the cheap model's answers are shorter; on algebra the judge prefers the longer
    # (strong) answer, on anything else it calls a tie.
    mock_upstream.configure(judge="longer", judge_only_on=HARD, reply_tokens_by_model={"mock-small": 4})
    with private_redis_keys(f"llmplabels{uuid.uuid4().hex[:8]}") as prefix:
        server = start_proxy(session_tmp, _policy(mock_upstream.url, prefix, EXPLORE), REDIS_URL)
        try:
            trivia = [_trivia(c) for c, _ in CAPITALS[:25]]
            algebra = [_algebra(i) for i in range(25)]
            private = "Private question quokka: what does our unreleased product cost?"
            fleeting = "Fleeting question kumquat: which labels expire in three seconds?"
            for text in [*trivia, *algebra]:
                assert _chat(server, LEARNER_KEY, text).headers["x-llm-proxy-model"] == "small"
            _chat(server, PRIVATE_KEY, private)
            _chat(server, FLEETING_KEY, fleeting)
            wait_for(lambda: _judged(server) >= 52, "52 judgements", 120)
            assert metric(server, "llm_proxy_shadow_judgements_total", policy="explore", outcome="loss") == 25
            wait_for(lambda: metric(server, "llm_proxy_shadow_labels_retained_total", policy="explore") == 51, "labels")

            # The opted-in team's labels: the judged outcome as a RouteLLM pairwise label.
            labels = _export(server)
            by_prompt = {row["prompt"]: row for row in labels if row["team"] == "learners"}
            assert set(by_prompt) == set(trivia) | set(algebra)
            assert {by_prompt[t]["winner"] for t in trivia} == {"tie"}
            assert {by_prompt[t]["winner"] for t in algebra} == {"strong"}
            assert by_prompt[trivia[0]]["model"] == "small" and by_prompt[trivia[0]]["counterfactual_model"] == "big"

            # The team that did not opt in: its prompt text is nowhere in the store; nor any prompt in logs
            # or metrics. (Each marker has letters past `f`: the store's write ids are hex and could spell a hex
            # marker by chance.)
            stored = _everything_stored(prefix)
            assert trivia[0] in stored and "quokka" not in stored and "{t:private}:label" not in stored
            assert all(row["team"] != "private" for row in labels)
            exposed = server.log() + httpx.get(server.url + "/metrics").text
            assert "quokka" not in exposed and "capital city" not in exposed and HARD not in exposed

            # The fleeting team's label expires after its 3 s: gone from the export and from Redis itself.
            wait_for(lambda: all(row["team"] != "fleeting" for row in _export(server)), "the label to expire", 30)
            wait_for(lambda: "kumquat" not in _everything_stored(prefix), "the prompt to leave Redis", 30)
            assert trivia[0] in _everything_stored(prefix)  # an hour's TTL: still there

            # Fit from the store, with the CLI, as an operator would.
            config = next(session_tmp.glob(f"policy-{server.port}.yaml"))
            router = tmp_path / "router.json"
            fit = _cli(
                "router", "fit", "--from-store", "--policy", "explore", "--config", str(config),
                "--out", str(router), "--target-quality", "0.99", "--threads", "1",
                env={"LLM_PROXY_REDIS_URL": REDIS_URL},
            )  # fmt: skip
            assert fit.returncode == 0, fit.stderr
            assert "50 pairwise labels" in fit.stdout, fit.stdout
            doc = json.loads(router.read_text())
            assert doc["labels"] == {**doc["labels"], "n": 50, "format": "pairwise"}
            assert doc["held_out"]["strong_share"] == pytest.approx(0.5, abs=0.06)

            # The running proxy picks up the router on reload and routes by its prediction.
            config.write_text(_policy(mock_upstream.url, prefix, _learned(router)))
            r = httpx.post(server.url + "/admin/reload", headers=ADMIN, timeout=600)
            assert r.status_code == 200, r.text

            def predicted() -> dict | None:
                # A reload that brings the first embedder into use loads MiniLM after it: until then the
                # router has no prediction and nothing routes. explain makes no upstream call.
                r = httpx.post(
                    server.url + "/v1/proxy/explain",
                    headers={"Authorization": f"Bearer {LEARNER_KEY}"},
                    json={"model": "big", "messages": [{"role": "user", "content": _trivia("Mali")}]},
                    timeout=30,
                )
                return r.json().get("router", {}).get("learned-small")

            prediction = wait_for(predicted, "the router's first prediction", 300)
            assert prediction["routes"] is True and prediction["threshold"] == pytest.approx(doc["threshold"])
            for country, _ in CAPITALS[25:]:
                raw = _chat(server, LEARNER_KEY, _trivia(country))
                assert raw.headers["x-llm-proxy-model"] == "small", country
                assert raw.headers["x-llm-proxy-policies"] == "learned-small"
            for i in range(30, 35):
                assert _chat(server, LEARNER_KEY, _algebra(i)).headers["x-llm-proxy-model"] == "big", i
        finally:
            server.stop()
            mock_upstream.reset()


def test_fit_from_the_store_refuses_clearly_without_enough_labels(session_tmp, mock_upstream, tmp_path):
    with private_redis_keys(f"llmplabels{uuid.uuid4().hex[:8]}") as prefix:
        config = tmp_path / "p.yaml"
        config.write_text(_policy(mock_upstream.url, prefix, EXPLORE))
        out = tmp_path / "router.json"
        base = ("router", "fit", "--from-store", "--config", str(config), "--out", str(out))
        redis_env = {"LLM_PROXY_REDIS_URL": REDIS_URL}
        r = _cli(*base, "--policy", "explore")  # no Redis URL
        assert r.returncode == 1 and "set LLM_PROXY_REDIS_URL" in r.stderr and "/admin/shadow/labels" in r.stderr
        r = _cli(*base, env=redis_env)
        assert r.returncode == 1 and "--from-store needs --policy NAME" in r.stderr
        r = _cli(*base, "--policy", "nope", env=redis_env)
        assert r.returncode == 1 and "policy 'nope' is not a shadowed policy" in r.stderr, r.stderr
        # A store with too few judged samples (a few, kept for the team that retains prompts).
        store = RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix))

        async def keep(n: int) -> None:
            for i in range(n):
                row = {"prompt": f"q{i}", "winner": "tie" if i % 2 else "strong"}
                await store.put_label("learners", "explore", json.dumps(row).encode(), 3600)
            await store.close()

        asyncio.run(keep(3))
        r = _cli(*base, "--policy", "explore", env=redis_env)
        assert r.returncode == 1
        assert "store labels of policy explore (teams fleeting, learners): 3 labels; a router needs at least 20" in (
            r.stderr
        ), r.stderr
        assert not out.exists()
        # A policy file where no team retains prompts has nothing to fit from.
        config.write_text(_policy(mock_upstream.url, prefix, EXPLORE).replace(", retain_prompts: {ttl: 3s}", ""))
        config.write_text(config.read_text().replace(", retain_prompts: {ttl: 1h}", ""))
        r = _cli(*base, "--policy", "explore", env=redis_env)
        assert r.returncode == 1 and "no team retains prompts" in r.stderr, r.stderr


def _load(tmp: Path, text: str):
    path = tmp / "p.yaml"
    path.write_text(text)
    return load_policy_file(path)


@pytest.mark.parametrize(
    ("retain", "expected"),
    [
        ("{ttl: 7 weeks}", "is not a duration: write a number and a unit"),
        ("{ttl: 0s}", "greater than or equal to 1"),
        ("{ttl: 45d}", "less than or equal to 2592000"),
        ("{}", "ttl: Field required"),
        ("{ttl: 7d, forever: true}", "retain_prompts.forever: unknown key"),
    ],
)
def test_a_bad_retention_setting_is_a_check_error_with_file_and_line(tmp_path, retain, expected):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, _policy("http://127.0.0.1:9", "p", EXPLORE, retain))
    text = str(e.value)
    assert f"{tmp_path / 'p.yaml'}:9: teams.learners.retain_prompts" in text and expected in text, text


def test_retention_reads_durations_and_needs_shadow_evaluation(tmp_path):
    policy = _load(tmp_path, _policy("http://127.0.0.1:9", "p", EXPLORE, "{ttl: 12h}"))
    assert policy.teams["learners"].retain_prompts.ttl == 43200
    assert policy.teams["fleeting"].retain_prompts.ttl == 3
    assert _load(tmp_path, _policy("http://127.0.0.1:9", "p", EXPLORE, "{ttl: 90}")).teams[
        "learners"
    ].retain_prompts.ttl == pytest.approx(90)
    unshadowed = _policy("http://127.0.0.1:9", "p", EXPLORE).replace("    shadow: {rate: 1.0}\n", "")
    with pytest.raises(ConfigError, match=r"teams.learners.retain_prompts: keeps the prompts of judged shadow"):
        _load(tmp_path, unshadowed)
    excluded = _policy("http://127.0.0.1:9", "p", EXPLORE).replace(
        "workers: 2}", "workers: 2, exclude_teams: [fleeting]}"
    )
    with pytest.raises(ConfigError, match=r"teams.fleeting.retain_prompts: the team is in evaluation.exclude_teams"):
        _load(tmp_path, excluded)


# ------------------------------------------------------------------------------------ the stores


def _stores():
    yield "memory", MemoryStore(max_labels=3), None
    prefix = f"llmplabels{uuid.uuid4().hex[:8]}"
    yield "redis", RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix)), prefix


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_stores_keep_labels_per_team_until_their_ttl_and_at_most_the_cap(kind, monkeypatch):
    monkeypatch.setattr("proxy.store.redis.MAX_LABELS", 3)
    name, store, prefix = next(s for s in _stores() if s[0] == kind)

    async def run() -> None:
        try:
            for i in range(5):
                await store.put_label("a", "p", f"label {i}".encode(), 3600)
            await store.put_label("b", "p", b"other team", 3600)
            assert await store.labels("a", "p") == [b"label 2", b"label 3", b"label 4"]  # the oldest forgotten
            assert await store.labels("b", "p") == [b"other team"] and await store.labels("a", "q") == []
            await store.put_label("a", "short", b"fleeting", 0.3)
            assert await store.labels("a", "short") == [b"fleeting"]
        finally:
            if name == "redis":
                await store.close()

    asyncio.run(run())

    async def expired() -> bool:
        probe = store if name == "memory" else RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix))
        try:
            return await probe.labels("a", "short") == []
        finally:
            if name == "redis":
                await probe.close()

    wait_for(lambda: asyncio.run(expired()), "the short label to expire", 10)
    if prefix is not None:
        try:
            stored = _everything_stored(prefix)
            assert "fleeting" not in stored and "label 0" not in stored and "label 4" in stored
        finally:
            delete_redis_keys(prefix)
