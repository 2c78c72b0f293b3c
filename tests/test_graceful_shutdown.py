"""SIGTERM while requests are in flight, with one process and with `--workers 2`: the requests in flight
complete, new connections are refused from the moment shutdown starts, their spend reaches Redis before
the process exits, and it exits 0. Past `--graceful-timeout` the requests left are cancelled and still
settle: no reservation is left behind and what a cut stream relayed is billed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import (
    MASTER_KEY,
    ROOT,
    MockUpstream,
    Server,
    free_port,
    policy_yaml,
    start_process,
    wait_for,
    wait_until_serving,
)
from tests.redis_servers import OwnRedis

KEY = "sk-shutdown-test"
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens
IN_FLIGHT = 6  # half streams, half not


def _policy(mock_url: str, prefix: str) -> str:
    team = f"  shutdown:\n    keys: [{KEY}]\n    models: [slow, held]\n    budget: {{usd: 100, period: day}}\n"
    model = "".join(
        f"  {name}:\n    api_base: {mock_url}/v1\n    upstream_model: mock-{name}\n"
        f"    price: {{input_per_mtok: {PRICE_IN}, output_per_mtok: {PRICE_OUT}}}\n    timeout_s: 60\n"
        for name in ("slow", "held")
    )
    base = policy_yaml(mock_url).replace("models:\n", "models:\n" + model, 1).replace("teams:\n", "teams:\n" + team, 1)
    return base + f"store:\n  key_prefix: {prefix}\n"


@pytest.fixture
def own_mock(tmp_path: Path):
    port = free_port()
    server = start_process(["mock-upstream", "--port", str(port)], port, "/v1/models", tmp_path)
    mock = MockUpstream(server.proc, server.port, server.log_path)
    yield mock
    mock.stop()


@pytest.fixture
def own_redis(tmp_path: Path):
    redis_server = OwnRedis(tmp_path).start()
    yield redis_server
    redis_server.stop()


def _start(tmp_path: Path, mock: MockUpstream, redis_server: OwnRedis, *extra: str) -> Server:
    port = free_port()
    config = tmp_path / f"policy-{port}.yaml"
    config.write_text(_policy(mock.url, "shut"))
    log_path = tmp_path / f"proxy-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_REDIS_URL"}
    env |= {"LLM_PROXY_MASTER_KEY": MASTER_KEY, "LLM_PROXY_REDIS_URL": redis_server.url}
    args = ["serve", "--config", str(config), "--port", str(port), "--log-level", "info", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(proc, port, log_path)
    try:
        # Two workers each import the whole proxy: on a loaded machine that takes longer than one.
        wait_until_serving(server.url + "/healthz", proc)
    except Exception as e:
        server.stop()
        raise RuntimeError(f"could not start {args}:\n{server.log()}") from e
    return server


def _request(url: str, i: int, plain_model: str = "slow") -> tuple[str, str]:
    """One request as a client sees it: ("ok", text) or (error kind, detail). Odd ones are not streamed."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=90)
    messages = [{"role": "user", "content": f"in flight {i}"}]
    try:
        if i % 2:
            reply = client.chat.completions.create(model=plain_model, messages=messages)
            return "ok", reply.choices[0].message.content or ""
        parts, finished = [], False
        for chunk in client.chat.completions.create(model="slow", messages=messages, stream=True):
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finished = finished or choice.finish_reason == "stop"
        return ("ok" if finished else "unfinished"), "".join(parts)
    except openai.APIError as e:
        return type(e).__name__, str(e)


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def _spend(redis_server: OwnRedis) -> dict[str, int]:
    client = redis_server.client()
    try:
        total = {k.decode(): int(v) for k, v in client.hgetall("shut:{t:shutdown}:spend:total").items()}
        budget = {}
        for key in client.scan_iter("shut:{t:shutdown}:budget:team:*"):
            budget = {k.decode(): int(v) for k, v in client.hgetall(key).items()}
    finally:
        client.close()
    return {
        "requests": total.get("slow|requests", 0),
        "in": total.get("slow|in", 0),
        "out": total.get("slow|out", 0),
        "nano": total.get("slow|nano", 0),
        "budget_spent": budget.get("spent", 0),
        "budget_reserved": budget.get("reserved", 0),
    }


def _served_nano(mock: MockUpstream) -> tuple[int, int, int]:
    stats = mock.stats()
    prompt, completion = stats["prompt_tokens_served"], stats["completion_tokens_served"]
    return prompt, completion, round(prompt * PRICE_IN * 1000 + completion * PRICE_OUT * 1000)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_requests_in_flight_finish_flushes_their_spend_and_exits_zero(
    tmp_path, own_mock, own_redis, workers
):
    proxy = _start(tmp_path, own_mock, own_redis, "--workers", str(workers))
    # Non-stream replies take 2 s; streams send 20 chunks 100 ms apart: all are in flight at SIGTERM.
    own_mock.configure(latency_ms=2000, chunk_delay_ms=100, reply_tokens=20)
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(_request, proxy.url, i) for i in range(IN_FLIGHT)]
            wait_for(lambda: own_mock.calls() == IN_FLIGHT, "every request to reach the upstream", 20)
            proxy.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _refuses_connections(proxy.port), "new connections to be refused", 10)
            # Refused while the requests already in flight are still being served.
            assert not all(f.done() for f in futures)
            results = [f.result(timeout=60) for f in futures]
        assert [kind for kind, _ in results] == ["ok"] * IN_FLIGHT, results
        assert all(len(text.split()) == 20 for _, text in results)
        assert proxy.proc.wait(30) == 0, proxy.log()[-3000:]
        prompt, completion, served_nano = _served_nano(own_mock)
        spend = _spend(own_redis)
        assert spend["requests"] == IN_FLIGHT
        assert (spend["in"], spend["out"]) == (prompt, completion)
        assert abs(spend["nano"] - served_nano) <= IN_FLIGHT  # each request rounds to whole nano-USD
        assert spend["budget_reserved"] == 0 and spend["budget_spent"] == spend["nano"]
        assert "Traceback" not in proxy.log()
    finally:
        proxy.stop()


def test_past_the_graceful_timeout_requests_are_cancelled_and_still_settle(tmp_path, own_mock, own_redis):
    proxy = _start(tmp_path, own_mock, own_redis, "--graceful-timeout", "1")
    # Far longer than the graceful timeout: non-stream replies stall 40 s, streams send 60 chunks 0.5 s apart.
    own_mock.configure(chunk_delay_ms=500, reply_tokens=60)
    own_mock.fault(stall_s=40, count=IN_FLIGHT // 2, model="mock-held")
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(_request, proxy.url, i, "held") for i in range(IN_FLIGHT)]
            wait_for(lambda: own_mock.calls() == IN_FLIGHT, "every request to reach the upstream", 20)
            started = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(30) == 0, proxy.log()[-3000:]
            assert time.monotonic() - started < 15  # the cancel came at the graceful timeout, not at 30 s
            results = [f.result(timeout=60) for f in futures]
        # Nobody got a success that was not one; the cut streams got what was relayed before the cancel.
        assert all(kind != "ok" for kind, _ in results), results
        spend = _spend(own_redis)
        assert spend["budget_reserved"] == 0  # every reservation was released on the way out
        assert spend["budget_spent"] == spend["nano"]
        # The streams relayed some chunks before the cancel: those are billed (the non-streams, never
        # answered, cost nothing).
        assert spend["out"] > 0 and spend["requests"] == IN_FLIGHT // 2
        # The only exceptions are uvicorn's report of the tasks it cancelled; none in settling.
        log = proxy.log()
        raised = {line.split(":", 1)[0] for line in log.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", line)}
        assert raised <= {"asyncio.exceptions.CancelledError"}, log[-3000:]
        assert "on_settle" not in log, log[-3000:]  # no settle was cut short by the loop closing
        assert "not settled" not in log and "not written to the store" not in log
    finally:
        proxy.stop()


def test_spend_journalled_while_redis_is_down_reaches_it_when_it_returns_during_shutdown(tmp_path, own_mock, own_redis):
    proxy = _start(tmp_path, own_mock, own_redis)
    own_mock.configure(reply_tokens=10)
    try:
        own_redis.stop()
        results = [_request(proxy.url, i) for i in range(4)]  # fail_open: served, spend journalled
        assert [kind for kind, _ in results] == ["ok"] * 4, results
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "Waiting for application shutdown" in proxy.log(), "the lifespan shutdown to begin", 20)
        own_redis.start()  # back while the proxy is closing its store
        assert proxy.proc.wait(30) == 0, proxy.log()[-3000:]
        prompt, completion, served_nano = _served_nano(own_mock)
        spend = _spend(own_redis)
        assert spend["requests"] == 4 and (spend["in"], spend["out"]) == (prompt, completion)
        assert abs(spend["nano"] - served_nano) <= 4
        assert spend["budget_reserved"] == 0 and spend["budget_spent"] == spend["nano"]
        assert "not written to the store" not in proxy.log()
    finally:
        proxy.stop()
