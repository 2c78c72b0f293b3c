"""Faults under load: concurrent openai-SDK clients (stream and non-stream) keep sending while the test
switches the mock upstream's faults (429 with Retry-After, 500, 503, connection resets, stalls past the
upstream timeout, truncated JSON, streams cut mid-way) and kills and restarts the proxy's Redis.

Every request ends before its deadline and either succeeds or gets a clean OpenAI-shaped error; after
the load, the spend in the store equals the per-request costs the proxy reported (its request log) and
the price of the tokens the mock served, and no budget stays reserved."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, MockUpstream, admin_spend, free_port, policy_yaml, start_process, wait_for
from tests.redis_servers import OwnRedis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "sk-faults-test"
CLIENTS = 12
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens, both models
UPSTREAM_TIMEOUT_S = 1.0
MAX_TOTAL_S = 2.0
# The longest a request may take: the retry window, one more attempt's timeout that starts at its end,
# and generous slack for a loaded two-core machine. The SDK gives up there: a hang fails the test.
DEADLINE_S = MAX_TOTAL_S + UPSTREAM_TIMEOUT_S + 7.5
# What a failed request may answer: the upstream's own 429/500/503 relayed once retries are spent, 502 for
# a reply that is not valid, 503 when the upstream cannot be reached, 504 when it never answers in time.
CLEAN_STATUSES = {429, 500, 502, 503, 504}

# Each fault is applied to the next `count` upstream attempts that match it; retries draw on the same
# count, so some requests see the fault on every attempt (a clean error) and some recover.
FAULTS: list[tuple[str, dict]] = [
    ("429 + Retry-After", {"status": 429, "retry_after": "1", "count": 8}),
    ("500", {"status": 500, "count": 8}),
    ("503", {"status": 503, "count": 8}),
    ("connection reset", {"reset": True, "count": 8}),
    ("stall past timeout", {"stall_s": 3 * UPSTREAM_TIMEOUT_S, "count": 8}),
    ("truncated JSON", {"status": 200, "body": "malformed", "count": 6}),
    ("stream cut mid-way", {"after_chunks": 3, "count": 6, "model": "mock-stream"}),
]


@dataclass
class Outcome:
    phase: str
    stream: bool
    elapsed: float
    result: str  # ok | clean_error | bad
    status: int | None = None
    request_id: str | None = None
    cost_header: float | None = None
    detail: str = ""


def _policy(mock_url: str, prefix: str, log_path: Path) -> str:
    models = "".join(
        f"""
          {name}:
            api_base: {mock_url}/v1
            upstream_model: {upstream}
            price: {{input_per_mtok: {PRICE_IN}, output_per_mtok: {PRICE_OUT}}}
            timeout_s: {UPSTREAM_TIMEOUT_S}
            retries: {{max_attempts: 3, max_total_s: {MAX_TOTAL_S}, initial_backoff_s: 0.01,
                       max_backoff_s: 0.05, max_retry_after_s: 1.5}}"""
        for name, upstream in (("plain", "mock-plain"), ("streamed", "mock-stream"))
    )
    team = f"""
          faults:
            keys: [{KEY}]
            models: [plain, streamed]
            budget: {{usd: 1000, period: day}}
            limits: {{rpm: 100000}}"""
    base = policy_yaml(mock_url)
    base = base.replace("models:\n", "models:" + models.replace("\n        ", "\n") + "\n", 1)
    base = base.replace("teams:\n", "teams:" + team.replace("\n        ", "\n") + "\n", 1)
    return base + f"store:\n  key_prefix: {prefix}\n  on_failure: fail_open\nlog:\n  requests: {log_path}\n"


def _clean_body(response: httpx.Response) -> bool:
    """An OpenAI-shaped error that is not the proxy's own 'failed unexpectedly' (a bug, not a fault)."""
    try:
        err = response.json().get("error")
    except ValueError:
        return False
    return (
        isinstance(err, dict)
        and isinstance(err.get("message"), str)
        and isinstance(err.get("type"), str)
        and "failed unexpectedly" not in err["message"]
    )


async def _one(client: openai.AsyncOpenAI, stream: bool, phase: str, n: int) -> Outcome:
    started = time.monotonic()
    out = Outcome(phase, stream, 0.0, "bad")
    messages = [{"role": "user", "content": f"request {n} in {phase}"}]
    try:
        if stream:
            events = await client.chat.completions.create(
                model="streamed", messages=messages, stream=True, max_tokens=64
            )
            out.request_id = events.response.headers.get("x-llm-proxy-request-id")
            finished = False
            try:
                async for chunk in events:
                    finished = finished or any(c.finish_reason == "stop" for c in chunk.choices)
            except openai.APIError as e:
                if isinstance(e, openai.APIConnectionError):
                    raise
                # The stream broke after it began: one in-band OpenAI error event ends it.
                body = e.body if isinstance(e.body, dict) else {}
                ok = body.get("code") == "bad_upstream_response" and isinstance(body.get("message"), str)
                out.result, out.status, out.detail = ("clean_error" if ok else "bad"), 200, f"in-band: {body}"
                return out
            out.result = "ok" if finished else "bad"
            out.status = 200
            out.detail = "" if finished else "stream ended without a finish_reason or an error"
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model="plain", messages=messages, max_tokens=64
            )
            reply = raw.parse()
            out.request_id = raw.headers.get("x-llm-proxy-request-id")
            out.cost_header = float(raw.headers["x-llm-proxy-cost-usd"])
            out.status = raw.status_code
            out.result = "ok" if reply.choices and reply.choices[0].message.content else "bad"
    except (openai.APITimeoutError, openai.APIConnectionError) as e:
        out.detail = f"{type(e).__name__}: {e}"  # a hang or a dropped connection is never clean
    except openai.APIStatusError as e:
        out.status = e.status_code
        out.request_id = e.response.headers.get("x-llm-proxy-request-id")
        clean = e.status_code in CLEAN_STATUSES and _clean_body(e.response)
        out.result = "clean_error" if clean else "bad"
        out.detail = e.response.text[:200]
    except Exception as e:  # anything else the client met is a failure to report, not to crash the load on
        out.detail = f"{type(e).__name__}: {e}"
    finally:
        out.elapsed = time.monotonic() - started
    return out


class Load:
    """CLIENTS loops, each its own SDK client, alternating stream and non-stream requests."""

    def __init__(self, url: str):
        self.url = url
        self.phase = "no fault"
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, i: int) -> None:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=DEADLINE_S)
        n = 0
        try:
            while not self._stop.is_set():
                self.outcomes.append(await _one(client, (i + n) % 2 == 0, self.phase, i * 100000 + n))
                n += 1
        finally:
            await client.close()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(CLIENTS)]

    async def finish_more(self, n: int) -> None:
        """Wait until `n` more requests have completed."""
        target = len(self.outcomes) + n
        deadline = time.monotonic() + 60
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"the load stalled at {len(self.outcomes)} requests"
            for task in self._tasks:
                if task.done():
                    task.result()  # a client loop that died raises here
            await asyncio.sleep(0.02)  # the load's own tasks append outcomes; nothing else to wait on

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def _metric(url: str, name: str, label: str = "") -> float:
    """The sum of the series of `name` whose labels include `label`."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _log_lines(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {rec["request_id"]: rec for rec in map(orjson.loads, path.read_bytes().splitlines())}


def _figures(outcomes: list[Outcome], timeouts_at: dict[str, float]) -> str:
    by_phase: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_phase[o.phase][o.result] += 1
        by_phase[o.phase][f"{'stream' if o.stream else 'plain'}"] += 1
        if o.result == "clean_error":
            by_phase[o.phase][f"status {o.status}" + (" in-band" if o.stream and o.status == 200 else "")] += 1
    rows = [
        "| phase | sent | succeeded | failed cleanly | bad | clean errors by status | upstream timeouts |",
        "|---|---|---|---|---|---|---|",
    ]
    phases = list(timeouts_at)
    for phase, c in by_phase.items():
        statuses = ", ".join(
            f"{k.removeprefix('status ')}: {v}" for k, v in sorted(c.items()) if k.startswith("status")
        )
        sent = c["ok"] + c["clean_error"] + c["bad"]
        after = phases[phases.index(phase) + 1] if phase in phases and phases.index(phase) + 1 < len(phases) else None
        timeouts = int(timeouts_at[after] - timeouts_at[phase]) if after else "-"
        rows.append(
            f"| {phase} | {sent} | {c['ok']} | {c['clean_error']} | {c['bad']} | {statuses or '-'} | {timeouts} |"
        )
    return "\n".join(rows)


async def test_fault_matrix_under_load_loses_no_spend_and_never_hangs(session_tmp, tmp_path):
    port = free_port()
    mock_server = start_process(["mock-upstream", "--port", str(port)], port, "/v1/models", tmp_path)
    mock = MockUpstream(mock_server.proc, mock_server.port, mock_server.log_path)
    own = OwnRedis(tmp_path).start()
    log_path = tmp_path / "requests.jsonl"
    proxy = None
    try:
        mock.configure(latency_ms=10, chunk_delay_ms=2, reply_tokens=12)
        prefix = f"llmpfaults{port}"
        port_p = free_port()
        config = tmp_path / "policy.yaml"
        config.write_text(_policy(mock.url, prefix, log_path))
        proxy = start_process(
            ["serve", "--config", str(config), "--port", str(port_p), "--log-level", "warning"],
            port_p,
            "/healthz",
            tmp_path,
            {"LLM_PROXY_MASTER_KEY": MASTER_KEY, "LLM_PROXY_REDIS_URL": own.url},
        )
        load = Load(proxy.url)
        timeouts_at: dict[str, float] = {}

        def timed_out() -> float:
            return _metric(proxy.url, "llm_proxy_upstream_errors_total", 'kind="timeout"')

        async def switch(phase: str) -> None:
            # Timed-out upstream attempts so far, read as each phase begins: the table shows them by phase.
            timeouts_at[phase] = await asyncio.to_thread(timed_out)
            load.phase = phase

        await switch("no fault")

        load.start()
        await load.finish_more(2 * CLIENTS)
        for name, fault in FAULTS:
            await switch(name)
            await asyncio.to_thread(mock.fault, **fault)
            await asyncio.to_thread(wait_for, lambda: mock.stats()["faults_pending"] == 0, f"the {name} faults", 60)
            await load.finish_more(CLIENTS)
            if "stall_s" in fault:  # the phase ends once its stalled attempts have timed out
                done = timeouts_at[name] + fault["count"]
                await asyncio.to_thread(wait_for, lambda d=done: timed_out() >= d, "the stalls to time out", 30)
        await switch("Redis killed")
        await asyncio.to_thread(own.proc.kill)
        await asyncio.to_thread(own.proc.wait)
        await load.finish_more(3 * CLIENTS)
        await switch("Redis restarted")
        await asyncio.to_thread(own.start)
        await load.finish_more(3 * CLIENTS)
        await switch("no fault (after)")
        await load.finish_more(2 * CLIENTS)
        await load.stop()
        await switch("end")

        outcomes = load.outcomes
        print("\n" + _figures(outcomes, timeouts_at))
        bad = [o for o in outcomes if o.result == "bad"]
        assert not bad, bad[:5]
        # No request outlived its deadline (the SDK would have raised APITimeoutError, counted as bad).
        assert max(o.elapsed for o in outcomes) < DEADLINE_S
        applied = mock.stats()["faults_applied"]
        assert all(applied.get(k) for k in ("status:429", "status:500", "status:503", "reset", "stall")), applied
        assert applied.get("status:200:malformed") and applied.get("stream_cut"), applied
        assert {o.status for o in outcomes if o.result == "clean_error"} - {200} <= CLEAN_STATUSES

        # After the load: the journal written while Redis was down is flushed, the request log is complete.
        await asyncio.to_thread(
            wait_for, lambda: _metric(proxy.url, "llm_proxy_store_journal_entries") == 0, "the journal to flush", 30
        )
        ids = {o.request_id for o in outcomes}
        assert None not in ids
        lines = await asyncio.to_thread(wait_for, lambda: (lines := _log_lines(log_path)).keys() >= ids and lines)
        served = mock.stats()
        spend = admin_spend(proxy)["teams"]["faults"]
        models = spend["by_model"]
        recorded_in = sum(m["input_tokens"] for m in models.values())
        recorded_out = sum(m["output_tokens"] for m in models.values())
        reported_usd = sum(rec["cost_usd"] for rec in lines.values())
        served_usd = (served["prompt_tokens_served"] * PRICE_IN + served["completion_tokens_served"] * PRICE_OUT) / 1e6
        slowest = max(o.elapsed for o in outcomes)
        print(
            f"slowest request {slowest:.2f} s (deadline {DEADLINE_S} s); "
            f"requests {len(outcomes)}; spend recorded ${spend['spend_usd']:.9f} "
            f"(in {recorded_in}, out {recorded_out} tokens); per-request costs reported ${reported_usd:.9f}; "
            f"served by the mock ${served_usd:.9f} (in {served['prompt_tokens_served']}, "
            f"out {served['completion_tokens_served']}); replies abandoned by the mock {served['abandoned']}; "
            f"faults applied {served['faults_applied']}"
        )
        # Each header the client saw is the cost the proxy logged for that request.
        for o in outcomes:
            if o.cost_header is not None:
                assert lines[o.request_id]["cost_usd"] == pytest.approx(o.cost_header, abs=1e-9)
        rounding = len(lines) * 1e-9  # each request's cost is stored in whole nano-USD
        assert spend["spend_usd"] == pytest.approx(reported_usd, abs=rounding)
        # Each stall costs exactly one timed-out attempt. More timeouts mean the loaded machine starved the
        # proxy past its upstream timeout on ordinary attempts: the mock then wrote those replies into
        # connections the proxy had given up on (and retried), so they count as served but never reached it.
        timeouts = _metric(proxy.url, "llm_proxy_upstream_errors_total", 'kind="timeout"')
        starved = int(timeouts) - applied["stall"]
        print(f"upstream attempts timed out: {int(timeouts)} ({applied['stall']} stalls, {starved} starved)")
        if starved == 0:
            assert (recorded_in, recorded_out) == (served["prompt_tokens_served"], served["completion_tokens_served"])
            assert spend["spend_usd"] == pytest.approx(served_usd, abs=rounding)
        else:
            most_per_attempt = 100 + 64  # a prompt here is under 100 tokens; replies are capped at max_tokens
            excess = served["prompt_tokens_served"] + served["completion_tokens_served"] - recorded_in - recorded_out
            assert 0 <= excess <= starved * most_per_attempt
        assert sum(m["requests"] for m in models.values()) == sum(
            1 for rec in lines.values() if rec["usage"]["prompt_tokens"] or rec["usage"]["completion_tokens"]
        )
        budget = spend["budget"]
        assert budget["reserved_usd"] == 0
        assert budget["spent_usd"] == pytest.approx(spend["spend_usd"], abs=rounding)
        assert "Traceback" not in proxy.log(), proxy.log()[-3000:]
    finally:
        if proxy is not None:
            proxy.stop()
        mock.stop()
        own.stop()
