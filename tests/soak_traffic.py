"""The soak test's load: mixed OpenAI traffic against one proxy, every request classified by what the
test asked for. Three lanes share one `Tally`: the mixed lane (chat, streams, completions, embeddings,
concise / route / retrieval-cache policies, bad requests, mid-stream disconnects), a rate-limit lane
that asks twice as fast as its team's rpm, and a serial fault lane that queues one upstream fault on
the mock and then sends the one request it is meant for (serial, so each outcome is exact)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson

KEYS = {"alpha": "sk-soak-alpha", "streams": "sk-soak-streams", "limited": "sk-soak-limited", "faults": "sk-soak-fault"}
LIMITED_RPM = 60
PRICES = {"small": (0.15, 0.6), "slow": (1.0, 2.0), "brittle": (1.0, 2.0)}  # per million tokens: in, out

# Outcomes a request can have; all but "unexpected" are what the test deliberately caused or asked for.
EXPECTED_ERRORS = ("bad_request", "rate_limited", "fault", "disconnect")
OUTCOMES = ("ok", *EXPECTED_ERRORS, "unexpected")


def policy_yaml(tag: str, fast: str, slow: str, prefix: str, embedder: str) -> str:
    """Upstream model names carry `tag` so that two proxies on the same mocks never take each other's faults."""

    def model(name: str, base: str, price: str, extra: str = "") -> str:
        return f"  {name}: {{api_base: {base}/v1, upstream_model: {tag}-{name}, price: {{{price}}}{extra}}}\n"

    budget = "budget: {usd: 1000, period: day}"
    return (
        "version: 1\n"
        "server: {max_body_bytes: 65536}\n"
        f"store: {{key_prefix: {prefix}}}\n"
        "retries: {max_attempts: 3, max_total_s: 10, initial_backoff_s: 0.01, max_backoff_s: 0.05, "
        "max_retry_after_s: 2}\n"
        "models:\n"
        + model("big", fast, "input_per_mtok: 2.5, output_per_mtok: 10", ", max_input_tokens: 2000")
        + model("small", fast, "input_per_mtok: 0.15, output_per_mtok: 0.6")
        + model("flaky", fast, "input_per_mtok: 1, output_per_mtok: 2", ", fallbacks: [small], timeout_s: 1")
        + model("brittle", fast, "input_per_mtok: 1, output_per_mtok: 2")
        + model("slow", slow, "input_per_mtok: 1, output_per_mtok: 2")
        + model("embed", fast, "input_per_mtok: 0.02", ", mode: embedding")
        + model("lookup-embed", fast, "input_per_mtok: 0.02", ", mode: embedding")  # only the cache uses it
        + "teams:\n"
        f"  alpha: {{keys: [{KEYS['alpha']}], models: ['*'], {budget}}}\n"
        f"  streams: {{keys: [{KEYS['streams']}], models: [small, slow, brittle], {budget}}}\n"
        f"  limited: {{keys: [{KEYS['limited']}], models: [small], {budget}, limits: {{rpm: {LIMITED_RPM}}}}}\n"
        f"  faults: {{keys: [{KEYS['faults']}], models: [flaky, brittle, small], {budget}}}\n"
        # A small cache with a short TTL: entries are evicted and expire all through the soak.
        f"collections:\n  answers: {{kind: cache, embedder: {embedder}, ttl_s: 120, max_entries: 50}}\n"
        "tasks:\n  summarize: {patterns: ['(?i)\\bsummari[sz]e\\b']}\n"
        "policies:\n"
        "  - name: no-batch-jobs\n"
        "    when: {headers: {x-job-kind: batch}}\n"
        "    reject: {message: 'Use the batch API for batch jobs.', status: 403}\n"
        "  - name: answer-cache\n"
        "    when: {models: [big], headers: {x-soak-cache: '1'}}\n"
        "    retrieve: {collection: answers, cache: true}\n"
        "  - name: cheap-summaries\n"
        "    when: {task: summarize, models: [big]}\n"
        "    route: {to: small, min_cost_multiple: 10}\n"
        "  - name: be-concise\n"
        "    when: {models: [big]}\n"
        "    concise: {holdout: 0.1}\n"
    )


@dataclass
class Tally:
    """What one proxy answered: outcome counts per lane since the sampler last took them, the cost
    headers summed per team, and what streams reported as usage."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    cost_headers: Counter[str] = field(default_factory=Counter)
    stream_usage_cost: float = 0.0
    partial_streams: int = 0  # disconnected or broken: the proxy counted what it relayed
    unexpected: list[str] = field(default_factory=list)

    def record(self, lane: str, outcome: str, detail: str = "") -> None:
        self.counts[(lane, outcome)] += 1
        if outcome == "unexpected" and len(self.unexpected) < 20:
            self.unexpected.append(detail)

    def take(self) -> Counter[tuple[str, str]]:
        counts, self.counts = self.counts, Counter()
        return counts


def _cost(headers: Any) -> float:
    return float(headers["x-llm-proxy-cost-usd"])


def _usage_cost(model: str, usage: Any) -> float:
    price_in, price_out = PRICES[model]
    return (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6


class Traffic:
    """The three lanes against one proxy. `stop` is set by the test when the soak is over."""

    def __init__(self, proxy_url: str, mock_url: str, tag: str, session: aiohttp.ClientSession, tally: Tally):
        self.url = proxy_url
        self.mock_url = mock_url
        self.tag = tag
        self.session = session
        self.tally = tally
        self.stop = asyncio.Event()
        self.sdk = {
            team: openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key=key, max_retries=0, timeout=30)
            for team, key in KEYS.items()
        }
        self._cache_asks = 0

    async def close(self) -> None:
        for client in self.sdk.values():
            await client.close()

    async def _paced(self, period_s: float, one: Callable[[int], Awaitable[None]]) -> None:
        """Call `one(i)` every `period_s` until stopped; a slow machine falls behind instead of bursting."""
        due = time.monotonic()
        i = 0
        while not self.stop.is_set():
            await one(i)
            i += 1
            due = max(due + period_s, time.monotonic())
            try:
                await asyncio.wait_for(self.stop.wait(), due - time.monotonic())
            except TimeoutError:
                pass

    # --- mixed lane ---------------------------------------------------------------------------

    async def mixed(self, worker: int, period_s: float) -> None:
        kinds = MIXED_CYCLE
        await self._paced(period_s, lambda i: self._one_mixed(kinds[(worker * 7 + i) % len(kinds)], worker, i))

    async def _one_mixed(self, kind: str, worker: int, i: int) -> None:
        try:
            outcome = await getattr(self, f"_{kind}")(worker, i)
        except openai.APIStatusError as e:
            outcome = f"unexpected: {kind} got {e.status_code} {e.message[:120]}"
        except Exception as e:  # any transport failure is unexpected
            outcome = f"unexpected: {kind} raised {type(e).__name__}: {str(e)[:120]}"
        if outcome.startswith("unexpected"):
            self.tally.record("mixed", "unexpected", outcome)
        else:
            self.tally.record("mixed", outcome)

    async def _chat(self, worker: int, i: int) -> str:
        messages = [{"role": "user", "content": f"Tell me about proxies, worker {worker} request {i}."}]
        raw = await self.sdk["alpha"].chat.completions.with_raw_response.create(model="small", messages=messages)
        raw.parse()
        self.tally.cost_headers["alpha"] += _cost(raw.headers)
        return "ok"

    async def _concise(self, worker: int, i: int) -> str:
        messages = [{"role": "user", "content": f"Explain token budgets in detail ({worker}/{i})."}]
        raw = await self.sdk["alpha"].chat.completions.with_raw_response.create(model="big", messages=messages)
        raw.parse()
        self.tally.cost_headers["alpha"] += _cost(raw.headers)
        if "be-concise" not in raw.headers.get("x-llm-proxy-policies", ""):
            return "unexpected: concise policy did not apply"
        return "ok"

    async def _route(self, worker: int, i: int) -> str:
        messages = [{"role": "user", "content": f"Summarize this report {worker}-{i}: sales rose, costs fell."}]
        raw = await self.sdk["alpha"].chat.completions.with_raw_response.create(model="big", messages=messages)
        raw.parse()
        self.tally.cost_headers["alpha"] += _cost(raw.headers)
        if raw.headers.get("x-llm-proxy-model") != "small":
            return f"unexpected: route answered by {raw.headers.get('x-llm-proxy-model')}"
        return "ok"

    async def _cache(self, worker: int, i: int) -> str:
        """A small share through the semantic cache: 10 recurring questions (hits once cached; the
        TTL and the 50-entry cap evict them) and every third one new (a miss that adds an entry)."""
        self._cache_asks += 1
        n = self._cache_asks
        topic = f"question number {n} asked once" if n % 3 == 0 else f"recurring question number {n % 10}"
        messages = [{"role": "user", "content": f"What is the answer to {topic}?"}]
        raw = await self.sdk["alpha"].chat.completions.with_raw_response.create(
            model="big", messages=messages, extra_headers={"x-soak-cache": "1"}
        )
        raw.parse()
        self.tally.cost_headers["alpha"] += _cost(raw.headers)
        return "ok"

    async def _completion(self, worker: int, i: int) -> str:
        raw = await self.sdk["alpha"].completions.with_raw_response.create(
            model="small", prompt=f"Once upon a time ({worker}/{i})", max_tokens=20
        )
        raw.parse()
        self.tally.cost_headers["alpha"] += _cost(raw.headers)
        return "ok"

    async def _embedding(self, worker: int, i: int) -> str:
        raw = await self.sdk["alpha"].embeddings.with_raw_response.create(
            model="embed", input=[f"first text {i}", f"second text {worker}"]
        )
        raw.parse()
        self.tally.cost_headers["alpha"] += _cost(raw.headers)
        return "ok"

    async def _stream(self, worker: int, i: int) -> str:
        stream = await self.sdk["streams"].chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": f"Stream a story ({worker}/{i})."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        if usage is None:
            return "unexpected: stream ended without usage"
        self.tally.stream_usage_cost += _usage_cost("small", usage)
        return "ok"

    async def _disconnect(self, worker: int, i: int) -> str:
        """Read three chunks of a slow stream, then drop the connection."""
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": f"A long story {worker}/{i}"}],
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {KEYS['streams']}"}
        async with self.session.post(self.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                return f"unexpected: disconnect stream got {resp.status}"
            seen = 0
            async for line in resp.content:
                seen += line.startswith(b"data: {")
                if seen == 3:
                    break
            resp.close()  # closes the connection itself, mid-stream
        self.tally.partial_streams += 1
        return "disconnect"

    async def _bad(self, worker: int, i: int) -> str:
        name, path, body, headers, status = BAD_REQUESTS[(worker + i) % len(BAD_REQUESTS)]
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.session.post(self.url + path, data=data, headers=headers) as resp:
            payload = await resp.read()
        if resp.status != status:
            return f"unexpected: bad request '{name}' got {resp.status}, not {status}"
        error = orjson.loads(payload).get("error", {})
        if set(error) != {"message", "type", "param", "code"} or not error["message"]:
            return f"unexpected: bad request '{name}' answered without an OpenAI error: {payload[:120]!r}"
        return "bad_request"

    # --- rate-limit lane ----------------------------------------------------------------------

    async def limited(self) -> None:
        """A minute's worth at once (so refusals start within the warm-up), then twice the team's rpm:
        about half of these are refused with 429 rate_limit_exceeded."""
        for i in range(LIMITED_RPM):
            await self._one_limited(-i)
        await self._paced(30 / LIMITED_RPM, self._one_limited)

    async def _one_limited(self, i: int) -> None:
        messages = [{"role": "user", "content": f"Limited ask {i}"}]
        try:
            raw = await self.sdk["limited"].chat.completions.with_raw_response.create(model="small", messages=messages)
            raw.parse()
            self.tally.cost_headers["limited"] += _cost(raw.headers)
            self.tally.record("limited", "ok")
        except openai.RateLimitError as e:
            code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
            ok = code == "rate_limit_exceeded" and "retry-after" in e.response.headers
            self.tally.record("limited", "rate_limited" if ok else "unexpected", f"429 without its code: {e.body}")
        except Exception as e:
            self.tally.record("limited", "unexpected", f"limited raised {type(e).__name__}: {str(e)[:120]}")

    # --- fault lane ---------------------------------------------------------------------------

    async def faults(self, period_s: float) -> None:
        await self._paced(period_s, self._one_fault)

    async def _one_fault(self, i: int) -> None:
        name, model, fault, stream, expect = FAULTS[i % len(FAULTS)]
        fault = {**fault, "model": f"{self.tag}-{model}"}
        try:
            async with self.session.post(self.mock_url + "/mock/faults", json=fault) as resp:
                resp.raise_for_status()
            if stream:
                outcome = await self._broken_stream(model)
            else:
                outcome = await self._faulty_chat(model)
        except Exception as e:
            outcome = f"raised {type(e).__name__}: {str(e)[:120]}"
        if outcome == expect:  # retried or fallen back: ok; relayed or in-band: a caused error
            self.tally.record("faults", "ok" if expect.startswith("200") and "error" not in expect else "fault")
        else:
            self.tally.record("faults", "unexpected", f"fault '{name}': expected {expect}, got {outcome}")

    async def _faulty_chat(self, model: str) -> str:
        messages = [{"role": "user", "content": "An ask that meets a fault"}]
        try:
            raw = await self.sdk["faults"].chat.completions.with_raw_response.create(model=model, messages=messages)
        except openai.APIStatusError as e:
            return str(e.status_code)
        raw.parse()
        self.tally.cost_headers["faults"] += _cost(raw.headers)
        return f"200 {raw.headers.get('x-llm-proxy-model')}"

    async def _broken_stream(self, model: str) -> str:
        """The upstream drops the stream after three chunks: the client gets an in-band error event."""
        body = {"model": model, "messages": [{"role": "user", "content": "A stream that breaks"}], "stream": True}
        headers = {"Authorization": f"Bearer {KEYS['streams']}"}
        async with self.session.post(self.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            lines = [line async for line in resp.content]
        self.tally.partial_streams += 1
        errors = [line for line in lines if line.startswith(b'data: {"error"')]
        return f"{resp.status} in-band error" if errors else f"{resp.status} no error event"


MIXED_CYCLE = [
    "chat",
    "stream",
    "bad",
    "concise",
    "completion",
    "chat",
    "embedding",
    "route",
    "bad",
    "stream",
    "chat",
    "cache",
    "disconnect",
    "completion",
    "bad",
    "concise",
    "chat",
    "embedding",
    "stream",
    "route",
]

_JSON = {"content-type": "application/json"}
_ALPHA = {**_JSON, "Authorization": f"Bearer {KEYS['alpha']}"}
_HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
# name, path, body, headers, status: each must get this status and an OpenAI-shaped error.
BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str], int]] = [
    ("invalid json", CHAT, b'{"model": "small", "messages": [', _ALPHA, 400),
    ("unknown model", CHAT, {"model": "gpt-9000", "messages": _HI}, _ALPHA, 404),
    ("api_base in body", CHAT, {"model": "small", "messages": _HI, "api_base": "http://evil"}, _ALPHA, 400),
    ("missing key", CHAT, {"model": "small", "messages": _HI}, _JSON, 401),
    ("wrong key", CHAT, {"model": "small", "messages": _HI}, {**_JSON, "Authorization": "Bearer sk-nope"}, 401),
    (
        "model not allowed",
        CHAT,
        {"model": "big", "messages": _HI},
        {**_JSON, "Authorization": f"Bearer {KEYS['streams']}"},
        403,
    ),
    (
        "over-long prompt",
        CHAT,
        {"model": "big", "messages": [{"role": "user", "content": "word " * 2500}]},
        _ALPHA,
        400,
    ),
    ("oversized body", CHAT, {"model": "small", "messages": [{"role": "user", "content": "x" * 70000}]}, _ALPHA, 413),
    ("form body", CHAT, b"model=small", {**_ALPHA, "content-type": "application/x-www-form-urlencoded"}, 415),
    ("rejected by policy", CHAT, {"model": "small", "messages": _HI}, {**_ALPHA, "x-job-kind": "batch"}, 403),
    ("embedding model on chat", CHAT, {"model": "embed", "messages": _HI}, _ALPHA, 400),
    ("empty embedding input", "/v1/embeddings", {"model": "embed", "input": []}, _ALPHA, 400),
]

# name, model, fault queued on the mock (for this proxy's upstream model), stream?, exact expected outcome
FAULTS: list[tuple[str, str, dict[str, Any], bool, str]] = [
    ("one 503, retried", "brittle", {"status": 503, "count": 1}, False, "200 brittle"),
    ("500 on every attempt", "brittle", {"status": 500, "count": 3}, False, "500"),
    ("502s, then the fallback", "flaky", {"status": 502, "count": 3}, False, "200 small"),
    ("connection resets", "brittle", {"reset": True, "count": 3}, False, "503"),
    ("malformed reply (not retried)", "brittle", {"status": 200, "body": "malformed"}, False, "502"),
    (
        "429 with Retry-After 0, retried",
        "brittle",
        {"status": 429, "retry_after": "0", "count": 1},
        False,
        "200 brittle",
    ),
    ("html error page", "brittle", {"status": 503, "body": "html", "count": 3}, False, "502"),
    ("stream cut after 3 chunks", "brittle", {"after_chunks": 3, "count": 1}, True, "200 in-band error"),
    ("stall past the timeout, retried", "flaky", {"stall_s": 1.3, "count": 1}, False, "200 flaky"),
]
