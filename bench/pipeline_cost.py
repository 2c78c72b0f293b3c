"""The pipeline's own CPU per request, in process: every step of bench/hot_path.py's policy, no HTTP.

HTTP serving and the upstream call are the same for the proxy and the bare floor; what the proxy adds
on top is this. In process and single-threaded, it is far less noisy than a load test on a shared
machine: the best of several repeats is reported.
With `--store redis` the store is the Redis one (local server; its own CPU is not counted), as `serve`
builds it (with the fail-open journal); `--concurrency N` runs N requests at a time, as a server under
load does, so that store calls made in the same event-loop turn can share a round trip.
Usage: .venv/bin/python -m bench.pipeline_cost [--requests 20000] [--repeats 5] [--store redis] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

import orjson

from bench.hot_path import BODY, KEY, REDIS_URL, full_policy
from proxy.config import load_policy_file
from proxy.pipeline.context import RequestContext
from proxy.pipeline.runtime import Runtime
from proxy.services.request_log import RequestLogWriter
from proxy.store.memory import MemoryStore
from proxy.upstream.reply import UpstreamReply
from proxy.wire.chat import CHAT
from proxy.wire.usage import TokenUsage

HEADERS = {"authorization": f"Bearer {KEY}", "content-type": "application/json", "host": "127.0.0.1"}
USAGE = {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}
REPLY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}], "usage": USAGE}
RAW_REPLY = orjson.dumps(REPLY)


async def _one(runtime: Runtime) -> None:
    ctx = RequestContext(request_id=secrets.token_hex(12), endpoint=CHAT.endpoint, headers=HEADERS, wire=CHAT)
    ctx.raw = BODY
    try:
        await runtime.pipeline.run_request(ctx)
        ctx.answered_by = ctx.model
        # Usage as the dispatcher hands it over (reading it is the upstream layer's work, outside the pipeline).
        ctx.reply = UpstreamReply(REPLY, RAW_REPLY, TokenUsage(USAGE["prompt_tokens"], USAGE["completion_tokens"]))
        await runtime.pipeline.run_response(ctx)
    finally:
        await runtime.pipeline.run_settle(ctx)


async def _many(runtime: Runtime, requests: int, concurrency: int) -> None:
    if concurrency == 1:
        for _ in range(requests):
            await _one(runtime)
        return
    left = [requests]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await _one(runtime)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(requests: int, repeats: int, store_name: str = "memory", concurrency: int = 1) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "policy.yaml"
        log = Path(tmp) / "requests.jsonl"
        prefix = f"llmpcost{secrets.token_hex(4)}"
        config.write_text(full_policy("http://127.0.0.1:9", prefix, str(log)))
        policy = load_policy_file(str(config))
        if store_name == "redis":
            from proxy.store import build_store

            store = build_store(REDIS_URL, policy.store)
            await store.start()
        else:
            store = MemoryStore()
        runtime = Runtime(policy, store, None, str(config), RequestLogWriter(str(log)))
        try:
            await _many(runtime, 500, concurrency)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.process_time()
                await _many(runtime, requests, concurrency)
                best = min(best, (time.process_time() - t0) / requests)
        finally:
            if store_name == "redis":
                await store.close()
                _forget(prefix)
    return best * 1e6


def _forget(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for k in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(k)
    client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--store", choices=("memory", "redis"), default="memory")
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()
    us = asyncio.run(measure(args.requests, args.repeats, args.store, args.concurrency))
    print(
        f"pipeline (every step, {args.store} store, concurrency {args.concurrency}), in process: "
        f"{us:.1f} µs CPU per request (best of {args.repeats})"
    )


if __name__ == "__main__":
    main()
