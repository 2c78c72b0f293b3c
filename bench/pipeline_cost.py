"""The pipeline's own CPU per request, in process: every step of bench/hot_path.py's policy, no HTTP.

HTTP serving and the upstream call are the same for the proxy and the bare floor; what the proxy adds
on top is this. In process and single-threaded, it is far less noisy than a load test on a shared
machine: the best of several repeats is reported.
Usage: .venv/bin/python -m bench.pipeline_cost [--requests 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

import orjson

from bench.hot_path import BODY, KEY, full_policy
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


async def measure(requests: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "policy.yaml"
        log = Path(tmp) / "requests.jsonl"
        config.write_text(full_policy("http://127.0.0.1:9", "bench", str(log)))
        runtime = Runtime(load_policy_file(str(config)), MemoryStore(), None, str(config), RequestLogWriter(str(log)))
        for _ in range(500):
            await _one(runtime)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            for _ in range(requests):
                await _one(runtime)
            best = min(best, (time.process_time() - t0) / requests)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    us = asyncio.run(measure(args.requests, args.repeats))
    print(f"pipeline (every step, memory store), in process: {us:.1f} µs CPU per request (best of {args.repeats})")


if __name__ == "__main__":
    main()
