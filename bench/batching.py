"""Micro-batching throughput: clients through the proxy to the naive reference backend, batching off
(requests forwarded concurrently; the backend runs them one at a time) versus on.

Two workloads: completions from the tiny random-weight Llama (~21M parameters, 32 new tokens, one torch
thread) and embeddings from MiniLM (one input per request). For each, closed-loop clients at concurrency
1, 8, 25, 64; each run warms up until every client has had an answer, then measures a window of at least
`--seconds` (longer when latencies are long, at most `--max-window`). Also the direct ceiling: the model
called in-process with one batch of 25 versus 25 calls of one, so the ratio has context.

A third workload, `mixed` (`--workloads mixed`): short and long completions prompts from closed-loop
clients, batched by count only versus bounded by memory (the model's serving facts), through an in-process
batcher to the same backend. A probe between the batcher and the backend counts the tokens (prompt plus
max output) of every call in flight on its own, so the peak it reports does not rest on the batcher's books.

Usage: .venv/bin/python -m bench.batching [--seconds 10] [--max-window 60] [--workloads emb,llm,mixed] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench"
CONCURRENCY = (1, 8, 25, 64)
# Per model: a few percent of a call under load (a tiny-Llama call of 25 takes seconds, a MiniLM one
# tens of milliseconds); a steady load leaves as soon as the last call's clients are back anyway.
MAX_WAIT_MS = {"llm": 50, "emb": 10}
EMB_ROUNDS = 4
NEW_TOKENS = 32
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)  # polling a port that is not open yet
    raise TimeoutError(url)


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _policy(backend_url: str) -> str:
    ref = f"api_base: {backend_url}/v1"
    batching = "batching: {max_batch_size: 64, max_wait_ms: %d, mode: %s}"
    return textwrap.dedent(
        f"""\
        version: 1
        models:
          llm-off:
            {ref}
            upstream_model: tiny-llama
            mode: completion
            price: {{input_per_mtok: 0.05, output_per_mtok: 0.05}}
          llm-on:
            {ref}
            upstream_model: tiny-llama
            mode: completion
            price: {{input_per_mtok: 0.05, output_per_mtok: 0.05}}
            {batching % (MAX_WAIT_MS["llm"], "completions")}
          emb-off:
            {ref}
            upstream_model: all-MiniLM-L6-v2
            mode: embedding
            price: {{input_per_mtok: 0.01}}
          emb-on:
            {ref}
            upstream_model: all-MiniLM-L6-v2
            mode: embedding
            price: {{input_per_mtok: 0.01}}
            {batching % (MAX_WAIT_MS["emb"], "embeddings")}
        teams:
          bench:
            keys: [sha256:{hashlib.sha256(KEY.encode()).hexdigest()}]
        """
    )


def _llm_body(model: str, i: int) -> bytes:
    prompt = f"Request {i}: write a few words about the number {i * 7919 % 1000}."
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})


def _emb_body(model: str, i: int) -> bytes:
    text = f"Sentence {i} about how batching many small requests into one call raises throughput."
    return orjson.dumps({"model": model, "input": text})


WORKLOADS = {"llm": ("/v1/completions", _llm_body), "emb": ("/v1/embeddings", _emb_body)}

# The mixed workload: every MIXED_LONG_EVERY-th client sends long prompts, the others short ones.
MIXED_CLIENTS = 8
MIXED_LONG_EVERY = 4
MIXED_NEW_TOKENS = 8
MIXED_TOKEN_BUDGET = 100  # tokens in flight the notional GPU holds (count-only batches reach ~230)
MIXED_MAX_WAIT_MS = 50


def _mixed_prompt(i: int, long: bool) -> str:
    if long:
        return f"Document {i}: " + " ".join(f"clause {i}.{j} of a long contract about shipping terms" for j in range(4))
    return f"Request {i}: a few words on {i * 7919 % 1000}."


def _mixed_facts() -> dict[str, Any]:
    """Serving facts whose budget is MIXED_TOKEN_BUDGET tokens: 0.5B fp16 parameters (1 GB of weights), no
    margin, 1 MB per token, and 1 GB + the budget of GPU memory. The tiny model on CPU has no such limit:
    the budget stands for the GPU memory a real model would have left."""
    gb = 1 + MIXED_TOKEN_BUDGET / 1000
    return {"hardware": {"gpu_memory_gb": gb, "memory_margin": 0}, "params_b": 0.5, "kv_mb_per_token": 1}


class _InFlightProbe:
    """Between the batcher and the upstream: counts the tokens of every call in flight from its body."""

    def __init__(self, inner: Any, counter: Any):
        self.name, self.cfg, self._inner, self._counter = inner.name, inner.cfg, inner, counter
        self.in_flight = self.peak = 0

    async def send(self, endpoint: str, body: dict[str, Any]) -> Any:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        tokens = sum(self._counter.prompt(p) for p in prompts) + body["max_tokens"] * len(prompts)
        self.in_flight += tokens
        self.peak = max(self.peak, self.in_flight)
        try:
            return await self._inner.send(endpoint, body)
        finally:
            self.in_flight -= tokens


async def _mixed_arm(backend_url: str, bounded: bool, seconds: float, max_window: float) -> dict[str, Any]:
    """Closed-loop clients of short and long prompts through one in-process batcher; one window."""
    from proxy.config.capacity import ModelMemory
    from proxy.config.models import ModelConfig
    from proxy.services.tokens import counter_for
    from proxy.upstream.batcher import MicroBatcher
    from proxy.upstream.openai_compat import OpenAICompatUpstream

    cfg = ModelConfig(
        api_base=backend_url + "/v1",
        upstream_model="tiny-llama",
        mode="completion",
        batching={"mode": "completions", "max_batch_size": 64, "max_wait_ms": MIXED_MAX_WAIT_MS},
        **(_mixed_facts() if bounded else {}),
    )
    counter = counter_for("tiny-llama")
    done: list[tuple[float, float, bool]] = []  # (finished at, latency, long)
    answered = [0] * MIXED_CLIENTS
    stop = asyncio.Event()
    counter_ids = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=MIXED_CLIENTS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        probe = _InFlightProbe(OpenAICompatUpstream("mixed", cfg, session, 5.0), counter)
        batcher = MicroBatcher(probe)  # type: ignore[arg-type]

        async def client(k: int) -> None:
            long = k % MIXED_LONG_EVERY == 0
            while not stop.is_set():
                i = next(counter_ids)
                body = {"model": "mixed", "prompt": _mixed_prompt(i, long), "max_tokens": MIXED_NEW_TOKENS}
                body["temperature"] = 0
                held = counter.prompt(body["prompt"]) + MIXED_NEW_TOKENS  # what the pipeline counts
                t0 = time.perf_counter()
                await batcher.send("completions", body, held)
                t1 = time.perf_counter()
                done.append((t1, t1 - t0, long))
                answered[k] += 1

        tasks = [asyncio.create_task(client(k)) for k in range(MIXED_CLIENTS)]
        while not all(answered) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.05)  # warm-up: every client has had an answer
        for t in tasks:
            if t.done():
                t.result()  # a client that failed: raise its error
        warm = max(lat for _, lat, _ in done)
        probe.peak = 0  # the window's peak, not the warm-up's
        t_start = time.perf_counter()
        await asyncio.sleep(min(max_window, max(seconds, 2 * warm)))
        t_end = time.perf_counter()
        stop.set()
        await asyncio.gather(*tasks)
        peak = probe.peak
    memory = ModelMemory.of(ModelConfig(**_mixed_facts()))
    assert memory is not None
    window = [(lat, long) for finished, lat, long in done if t_start <= finished <= t_end]
    return {"window": window, "window_s": t_end - t_start, "peak": peak, "budget": memory.token_budget}


def _mixed_summary(res: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(x for x, _ in res["window"])
    by_kind = {k: sorted(x for x, long in res["window"] if long == k) for k in (False, True)}

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000 if xs else float("nan")

    return {
        "n": len(lat),
        "n_short": len(by_kind[False]),
        "n_long": len(by_kind[True]),
        "rps": MIXED_CLIENTS / statistics.fmean(lat),  # Little's law, closed loop
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": p99(lat),
        "p99_short_ms": p99(by_kind[False]),
        "p99_long_ms": p99(by_kind[True]),
        "peak": res["peak"],
        "budget": res["budget"],
        "window_s": res["window_s"],
    }


async def _mixed(backend_url: str, seconds: float, max_window: float, rounds: int) -> list[str]:
    """Count-only versus memory-bounded, alternating in rounds so drift of a shared machine hits both."""
    runs: dict[str, list[dict[str, Any]]] = {"count-only": [], "memory-bounded": []}
    for _ in range(rounds):
        for arm in runs:
            res = await _mixed_arm(backend_url, arm == "memory-bounded", seconds / rounds, max_window)
            runs[arm].append(res)
            s = _mixed_summary(res)
            print(
                f"mixed {arm}: {s['rps']:.2f} req/s, p99 {s['p99_ms']:.0f} ms, peak {s['peak']} tokens in flight "
                f"(budget {s['budget']}), {s['n']} requests in {s['window_s']:.1f} s",
                flush=True,
            )
    lines = [
        f"Mixed completions, tiny random-weight Llama, {MIXED_CLIENTS} closed-loop clients (every "
        f"{MIXED_LONG_EVERY}th sends long prompts), {MIXED_NEW_TOKENS} new tokens, `max_batch_size: 64`, "
        f"`max_wait_ms: {MIXED_MAX_WAIT_MS}`; memory-bounded: a budget of {MIXED_TOKEN_BUDGET} tokens in flight:",
        "",
        "| batching | n (short / long) | req/s | p50 ms | p99 ms | p99 short ms | p99 long ms "
        "| peak tokens in flight | budget | peak / budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, arm_runs in runs.items():
        pooled = {
            "window": [w for r in arm_runs for w in r["window"]],
            "window_s": sum(r["window_s"] for r in arm_runs),
            "peak": max(r["peak"] for r in arm_runs),
            "budget": arm_runs[0]["budget"],
        }
        s = _mixed_summary(pooled)
        lines.append(
            f"| {arm} | {s['n']} ({s['n_short']} / {s['n_long']}) | {s['rps']:.2f} | {s['p50_ms']:.0f} "
            f"| {s['p99_ms']:.0f} | {s['p99_short_ms']:.0f} | {s['p99_long_ms']:.0f} | {s['peak']} "
            f"| {s['budget']} | {s['peak'] / s['budget']:.2f} |"
        )
    short, long = (_mixed_prompt(0, k) for k in (False, True))
    from proxy.services.tokens import counter_for

    c = counter_for("tiny-llama")
    lines += [
        "",
        f"Tokens per request as the proxy counts them (prompt + max output): short {c.prompt(short)} + "
        f"{MIXED_NEW_TOKENS}, long {c.prompt(long)} + {MIXED_NEW_TOKENS} (the backend's byte-level tokens: "
        f"{len(short.encode())} / {len(long.encode())} prompt bytes). {rounds} alternating rounds per arm, "
        "pooled; peak: the most tokens in flight a probe between the batcher and the backend saw in the "
        "measured windows.",
        "",
    ]
    return lines


async def _metric(session: aiohttp.ClientSession, url: str, name: str, model: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _run(proxy_url: str, workload: str, model: str, conc: int, seconds: float, max_window: float) -> dict:
    """Closed-loop clients; warm up until each has an answer, then measure one window."""
    path, body_for = WORKLOADS[workload]
    done: list[tuple[float, float]] = []  # (finished at, latency)
    answered = [0] * conc
    stop = asyncio.Event()
    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client(k: int) -> None:
            while not stop.is_set():
                body = body_for(model, next(counter))
                t0 = time.perf_counter()
                async with session.post(proxy_url + path, data=body, headers=AUTH) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                t1 = time.perf_counter()
                done.append((t1, t1 - t0))
                answered[k] += 1

        tasks = [asyncio.create_task(client(k)) for k in range(conc)]
        batches0 = await _metric(session, proxy_url, "llm_proxy_batch_size_count", model)
        rows0 = await _metric(session, proxy_url, "llm_proxy_batch_size_sum", model)
        wait0 = await _metric(session, proxy_url, "llm_proxy_batch_queue_wait_seconds_sum", model)
        waits0 = await _metric(session, proxy_url, "llm_proxy_batch_queue_wait_seconds_count", model)
        while not all(answered) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        warm = max(lat for _, lat in done)
        t_start = time.perf_counter()
        window = min(max_window, max(seconds, 2 * warm))
        await asyncio.sleep(window)
        t_end = time.perf_counter()
        stop.set()
        batches = await _metric(session, proxy_url, "llm_proxy_batch_size_count", model) - batches0
        rows = await _metric(session, proxy_url, "llm_proxy_batch_size_sum", model) - rows0
        wait = await _metric(session, proxy_url, "llm_proxy_batch_queue_wait_seconds_sum", model) - wait0
        waits = await _metric(session, proxy_url, "llm_proxy_batch_queue_wait_seconds_count", model) - waits0
        await asyncio.gather(*tasks)
    lat = [latency for finished, latency in done if t_start <= finished <= t_end]
    return {"lat": lat, "window_s": t_end - t_start, "batches": batches, "rows": rows, "wait": wait, "waits": waits}


async def _run_alternating(proxy_url: str, workload: str, seconds: float) -> dict[str, list[dict]]:
    """Concurrency 1: one client alternating off and on request by request (ABBA), so that the drift of
    a shared machine hits both alike; each mode's window is the time its own requests took."""
    path, body_for = WORKLOADS[workload]
    lat: dict[str, list[float]] = {"off": [], "on": []}
    async with aiohttp.ClientSession() as session:
        before = {
            n: await _metric(session, proxy_url, n, f"{workload}-on")
            for n in (
                "llm_proxy_batch_size_count",
                "llm_proxy_batch_size_sum",
                "llm_proxy_batch_queue_wait_seconds_sum",
            )
        }
        stop_at = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < stop_at or min(len(v) for v in lat.values()) < 2:
            for mode in ("off", "on") if i % 2 else ("on", "off"):
                t0 = time.perf_counter()
                async with session.post(proxy_url + path, data=body_for(f"{workload}-{mode}", i), headers=AUTH) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                if i >= 2:  # the first requests warm connections up
                    lat[mode].append(time.perf_counter() - t0)
            i += 1
        after = {n: await _metric(session, proxy_url, n, f"{workload}-on") for n in before}
    batches = after["llm_proxy_batch_size_count"] - before["llm_proxy_batch_size_count"]
    on = {
        "lat": lat["on"],
        "window_s": sum(lat["on"]),
        "batches": batches,
        "rows": after["llm_proxy_batch_size_sum"] - before["llm_proxy_batch_size_sum"],
        "wait": after["llm_proxy_batch_queue_wait_seconds_sum"] - before["llm_proxy_batch_queue_wait_seconds_sum"],
        "waits": batches,
    }
    off = {"lat": lat["off"], "window_s": sum(lat["off"]), "batches": 0, "rows": 0, "wait": 0.0, "waits": 0}
    return {"off": [off], "on": [on]}


def _summary(runs: list[dict], conc: int) -> dict:
    """Pooled over runs. Throughput by Little's law (closed loop, no think time: `conc` requests are
    always in the system), which a window does not quantise when answers come in batches."""
    lat = sorted(x for r in runs for x in r["lat"])
    window = sum(r["window_s"] for r in runs)
    batches, rows = sum(r["batches"] for r in runs), sum(r["rows"] for r in runs)
    waits, wait = sum(r["waits"] for r in runs), sum(r["wait"] for r in runs)
    return {
        "n": len(lat),
        "rps": conc / statistics.fmean(lat),
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
        "mean_batch": rows / batches if batches else 0.0,
        "mean_wait_ms": wait / waits * 1000 if waits else 0.0,
        "window_s": window,
    }


async def _at_once_overhead(calls: int = 4000, block: int = 100) -> tuple[float, float]:
    """p50 µs of one embeddings call to the in-process zero-latency mock: through the bare upstream
    client and through the batcher (a lone request, so sent at once), in alternating blocks."""
    from aiohttp import web

    from proxy.config.models import ModelConfig
    from proxy.fakes.mock_upstream import build_mock_app
    from proxy.upstream.batcher import MicroBatcher
    from proxy.upstream.openai_compat import OpenAICompatUpstream

    runner = web.AppRunner(build_mock_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with aiohttp.ClientSession() as session:
            cfg = ModelConfig(api_base=base, mode="embedding", batching={"mode": "embeddings"})
            bare = OpenAICompatUpstream("overhead", cfg, session, 5.0)
            batched = MicroBatcher(OpenAICompatUpstream("overhead", cfg, session, 5.0))
            body = {"model": "overhead", "input": "one sentence"}
            samples: dict[str, list[float]] = {"bare": [], "batched": []}
            for i in range(calls // block):
                name, upstream = ("bare", bare) if i % 2 == 0 else ("batched", batched)
                for _ in range(block):
                    t0 = time.perf_counter()
                    await upstream.send("embeddings", body)
                    samples[name].append(time.perf_counter() - t0)
    finally:
        await runner.cleanup()
    return statistics.median(samples["bare"]) * 1e6, statistics.median(samples["batched"]) * 1e6


def _ceiling(batch: int = 25) -> dict[str, tuple[float, float]]:
    """The models called in-process: one batch of `batch` versus `batch` calls of one (seconds)."""
    import torch

    from proxy.fakes.reference_backend import Embedder, Generator, minilm_path, tiny_causal_lm

    torch.set_num_threads(1)
    model, tokenizer = tiny_causal_lm()
    gen = Generator(model, tokenizer, "tiny-llama")
    prompts = [gen.encode(orjson.loads(_llm_body("m", i))["prompt"]) for i in range(batch)]
    gen.generate(prompts[:1], [NEW_TOKENS], 0.0, 1.0, None)  # warm up
    t0 = time.perf_counter()
    for p in prompts:
        gen.generate([p], [NEW_TOKENS], 0.0, 1.0, None)
    t1 = time.perf_counter()
    gen.generate(prompts, [NEW_TOKENS] * batch, 0.0, 1.0, None)
    t2 = time.perf_counter()
    emb = Embedder(str(minilm_path()), "minilm")
    texts = [orjson.loads(_emb_body("m", i))["input"] for i in range(batch)]
    emb.embed(texts[:1])
    t3 = time.perf_counter()
    for t in texts:
        emb.embed([t])
    t4 = time.perf_counter()
    emb.embed(texts)
    t5 = time.perf_counter()
    return {"llm": (t1 - t0, t2 - t1), "emb": (t4 - t3, t5 - t4)}


async def main_async(
    seconds: float, max_window: float, write: bool, workloads: list[str], concurrency: list[int]
) -> None:
    load_before = os.getloadavg()[0]
    print("direct ceiling (in-process, batch of 25 vs 25 × 1) ...", flush=True)
    ceiling = _ceiling()
    bare_us, batched_us = await _at_once_overhead()
    backend_port, proxy_port = _free_port(), _free_port()
    backend_url, proxy_url = f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{proxy_port}"
    backend = _spawn(["reference-backend", "--tiny", "--torch-threads", "1", "--port", str(backend_port)])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(_policy(backend_url))
        config = f.name
    proxy = _spawn(["serve", "--config", config, "--port", str(proxy_port), "--log-level", "warning"])
    results: dict[str, list[dict[str, Any]]] = {"llm": [], "emb": []}
    try:
        await _wait(backend_url + "/healthz", backend)
        await _wait(proxy_url + "/healthz", proxy)
        for workload in workloads:
            for conc in concurrency:
                row: dict[str, Any] = {"concurrency": conc}
                runs: dict[str, list[dict]] = {"off": [], "on": []}
                if conc == 1:
                    # generate() varies by tens of ms run to run: the LLM needs more samples
                    runs = await _run_alternating(proxy_url, workload, seconds * (3 if workload == "llm" else 1))
                else:
                    # Short embedding runs alternate off and on in rounds, so load from elsewhere hits both.
                    rounds = EMB_ROUNDS if workload == "emb" else 1
                    for _ in range(rounds):
                        for mode in ("off", "on"):
                            model = f"{workload}-{mode}"
                            res = await _run(proxy_url, workload, model, conc, seconds / rounds, max_window)
                            runs[mode].append(res)
                for mode in ("off", "on"):
                    res = row[mode] = _summary(runs[mode], conc)
                    print(
                        f"{workload} c={conc} batching {mode}: {res['rps']:.2f} req/s, p50 {res['p50_ms']:.1f} ms, "
                        f"p99 {res['p99_ms']:.1f} ms, mean batch {res['mean_batch']:.1f} "
                        f"({res['n']} requests in {res['window_s']:.1f} s)",
                        flush=True,
                    )
                results[workload].append(row)
    finally:
        for p in (proxy, backend):
            p.terminate()
        for p in (proxy, backend):
            p.wait(10)
        os.unlink(config)

    lines: list[str] = []
    titles = {
        "llm": f"Completions, tiny random-weight Llama (~21M parameters), {NEW_TOKENS} new tokens, one torch thread",
        "emb": "Embeddings, all-MiniLM-L6-v2, one input per request, one torch thread",
    }
    for workload in [w for w in ("llm", "emb") if w in workloads]:
        seq, batched = ceiling[workload]
        lines += [
            f"{titles[workload]}:",
            "",
            "| concurrency | off req/s | on req/s | throughput on/off | off p50 / p99 ms | on p50 / p99 ms "
            "| mean batch (on) | mean queue wait (on) ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results[workload]:
            off, on = r["off"], r["on"]
            lines.append(
                f"| {r['concurrency']} | {off['rps']:.2f} | {on['rps']:.2f} | {on['rps'] / off['rps']:.2f}x "
                f"| {off['p50_ms']:.1f} / {off['p99_ms']:.1f} | {on['p50_ms']:.1f} / {on['p99_ms']:.1f} "
                f"| {on['mean_batch']:.1f} | {on['mean_wait_ms']:.2f} |"
            )
        c1 = results[workload][0]
        lines += [
            "",
            f"Added p50 at concurrency {c1['concurrency']} (on − off): "
            f"{c1['on']['p50_ms'] - c1['off']['p50_ms']:+.2f} ms "
            f"(n = {c1['off']['n']} / {c1['on']['n']}; the batcher's own queue wait there: "
            f"{c1['on']['mean_wait_ms']:.3f} ms).",
            f"Direct ceiling, in-process: 25 calls of one {seq:.2f} s, one batch of 25 {batched:.2f} s: "
            f"{seq / batched:.2f}x.",
            "",
        ]
    lines.append(
        f"The batcher's own cost at low load (in-process, 4000 embeddings calls to the zero-latency mock, "
        f"alternating blocks): p50 {bare_us:.0f} µs through the bare upstream client, {batched_us:.0f} µs "
        f"through the batcher: {batched_us - bare_us:+.0f} µs per request.\n"
    )
    lines.append(
        f"Load average (1 min) of the machine, others' jobs included: {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.\n"
    )
    table = "\n".join(lines)
    print(table)
    if write:
        header = (
            f"\n## Micro-batching — {time.strftime('%Y-%m-%d')} — {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()} (`python -m bench.batching --seconds {seconds:g} "
            f"--max-window {max_window:g}`)\n\n"
            "Closed-loop clients through one proxy worker to `llm-numbers-proxy reference-backend --tiny` (one "
            "call at a time, one forward batch per call); batching off forwards the requests concurrently, on "
            f"uses `batching: {{max_batch_size: 64, max_wait_ms: {MAX_WAIT_MS['llm']} (completions) or "
            f"{MAX_WAIT_MS['emb']} (embeddings)}}`. Load generator, proxy and backend share the machine's cores; "
            "each run warms up until every client has an answer, then measures one window; throughput is "
            "concurrency / mean latency (Little's law; counting answers in a window is quantised when they "
            "come 25 at a time). Concurrency 1: one client alternating off and on request by request; embeddings "
            f"at higher concurrency: {EMB_ROUNDS} alternating rounds of off and on, pooled, so drift hits both "
            "alike.\n\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(header + table)


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


async def mixed_main_async(seconds: float, max_window: float, write: bool, rounds: int) -> None:
    load_before = os.getloadavg()[0]
    port = _free_port()
    backend_url = f"http://127.0.0.1:{port}"
    backend = _spawn(["reference-backend", "--tiny", "--torch-threads", "1", "--no-embeddings", "--port", str(port)])
    try:
        await _wait(backend_url + "/healthz", backend)
        lines = await _mixed(backend_url, seconds, max_window, rounds)
    finally:
        backend.terminate()
        backend.wait(10)
    lines.append(
        f"Load average (1 min) of the machine, others' jobs included: {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.\n"
    )
    table = "\n".join(lines)
    print(table)
    if write:
        header = (
            f"\n## Memory-bounded batching — {time.strftime('%Y-%m-%d')} — {platform.machine()}, "
            f"{os.cpu_count()} cores (shared, loaded), Python {platform.python_version()}, commit {_commit()} "
            f"(`python -m bench.batching --workloads mixed --seconds {seconds:g} --max-window {max_window:g} "
            f"--rounds {rounds}`)\n\n"
            "Closed-loop clients in the benchmark's process call one in-process micro-batcher (the proxy's, with "
            "`max_concurrent_batches: 1`) that calls `llm-numbers-proxy reference-backend --tiny` (CPU, one torch "
            "thread, one call at a time, left-padded batches) over loopback HTTP; each request passes the tokens "
            "the pipeline would count (prompt + max_tokens). Count-only: the model has no serving facts; "
            "memory-bounded: the same model with serving facts. Throughput is concurrency / mean latency "
            "(Little's law); each run warms up until every client has an answer, then measures one window. "
            "CPU only: no GPU machine was lent to this task, so the ≥ 10× goal with a real model on a GPU is "
            "not measured here.\n\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(header + table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="shortest measurement window per run")
    ap.add_argument("--max-window", type=float, default=60.0, help="longest measurement window per run")
    ap.add_argument("--write", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--workloads", default="emb,llm", help="comma-separated: emb, llm, mixed")
    ap.add_argument("--rounds", type=int, default=2, help="mixed: alternating rounds per arm")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated levels")
    args = ap.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if [w for w in workloads if w != "mixed"]:
        others = [w for w in workloads if w != "mixed"]
        asyncio.run(main_async(args.seconds, args.max_window, args.write, others, concurrency))
    if "mixed" in workloads:
        asyncio.run(mixed_main_async(args.seconds, args.max_window, args.write, args.rounds))


if __name__ == "__main__":
    main()
