"""What OpenTelemetry tracing costs per request, off and on, and what a runtime key costs to authenticate,
in one run.

Tracing: the whole gateway (every step of bench/hot_path.py's policy, memory store) driven in process
through its ASGI interface, its upstream calls going over loopback HTTP to the mock upstream (another
process). CPU per request is this process's CPU (all threads: the span exporter's too) over the
requests. Variants, each in a fresh process, rounds alternating, best round reported (noise on a shared
machine only ever adds CPU):
  * before: the same driver on the source tree of another commit (`--before DIR`, e.g. main without
    tracing: `git archive <commit> | tar -x -C DIR`), when given,
  * off: this tree, no OTEL_* variable set,
  * on: OTEL_EXPORTER_OTLP_ENDPOINT to an OTLP/HTTP sink (another process), sampler always_on: every
    request exports a server span and one client span; and the same with 10% of traces sampled.
Keys: the auth step in process, a policy-file key vs a runtime key this replica has cached.

Usage: .venv/bin/python -m bench.tracing_cost [--requests 3000] [--rounds 3] [--before DIR] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.hot_path import KEY, full_policy
from bench.overhead import ROOT, _free_port, _spawn, _wait

DRIVER = r"""
import asyncio, json, sys, time
import orjson
from proxy.app import create_app

KEY, N, CONCURRENCY = sys.argv[2], int(sys.argv[3]), 16
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 64})
SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
         "headers": [(b"authorization", b"Bearer " + KEY.encode()), (b"content-type", b"application/json"),
                     (b"content-length", str(len(BODY)).encode())]}

async def one(app, statuses):
    sent = False
    never = asyncio.get_running_loop().create_future()
    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        return await never  # the client never disconnects
    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
    await app(dict(SCOPE), receive, send)

async def main():
    app = create_app(sys.argv[1])
    await app.state.start()
    statuses = []
    async def worker(n):
        for _ in range(n):
            await one(app, statuses)
    await asyncio.gather(*(worker(50) for _ in range(CONCURRENCY)))  # warm up
    statuses.clear()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(N // CONCURRENCY) for _ in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await app.state.stop()
    bad = sum(1 for s in statuses if s != 200)
    n = len(statuses)
    print(json.dumps({"n": n, "bad": bad, "cpu_ms": cpu / n * 1000, "rps": n / wall}))

asyncio.run(main())
"""

SINK = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _drive(tree: Path, config: Path, requests: int, env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLM_PROXY_"))}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config), KEY, str(requests)],
        cwd=tree, env={**clean, "PYTHONPATH": str(tree), **env}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["bad"]:
        raise RuntimeError(f"{result['bad']} requests failed in {tree}")
    return result


async def _auth_cost(iterations: int) -> dict[str, float]:
    """µs per auth step: a policy-file key vs a runtime key in this replica's cache (no Redis is reached)."""
    import redis.asyncio as aioredis

    from proxy.config.models import TeamConfig
    from proxy.pipeline.context import RequestContext
    from proxy.services.keyring import KeyRing, hash_key
    from proxy.services.runtime_keys import KeyRecord, RuntimeKeys, new_secret
    from proxy.steps.auth import Authenticate
    from proxy.store.keys import RedisKeyStore

    runtime = RuntimeKeys(RedisKeyStore(aioredis.Redis(), "bench"))
    secret = new_secret()
    raw = json.dumps({"id": "vkbench", "team": "t", "name": "n", "budget": {"usd": 1, "period": "day"}}).encode()
    runtime._records["vkbench"] = KeyRecord.load(raw)
    runtime._by_digest[hash_key(secret)] = ("vkbench", None)
    step = Authenticate(KeyRing({"t": TeamConfig(keys=["sk-yaml-key"])}, runtime))
    out = {}
    for name, key in (("policy-file key", "sk-yaml-key"), ("runtime key (cached)", secret)):
        headers = {"authorization": f"Bearer {key}"}
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(iterations):
                await step.on_request(RequestContext(request_id="r", endpoint="chat", headers=headers))
            best = min(best, (time.perf_counter() - t0) / iterations * 1e6)
        out[name] = best
    return out


def run(requests: int, rounds: int, before: Path | None) -> tuple[list[dict], dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="tracing-cost-"))
    mock_port, sink_port = _free_port(), _free_port()
    mock = _spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])
    sink = _spawn([sys.executable, "-c", SINK, str(sink_port)])
    config = tmp / "policy.yaml"
    prefix = f"llmpbench{uuid.uuid4().hex[:6]}"  # the memory store: nothing reaches Redis
    config.write_text(full_policy(f"http://127.0.0.1:{mock_port}", prefix, str(tmp / "requests.jsonl")))
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}", "OTEL_TRACES_SAMPLER": "always_on"}
    ratio = {**on, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    variants = ([("before", before, {})] if before else []) + [
        ("off", ROOT, {}),
        ("on, every request sampled", ROOT, on),
        ("on, 10% sampled (traceidratio 0.1)", ROOT, ratio),
    ]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    try:
        asyncio.run(_wait(f"http://127.0.0.1:{mock_port}/v1/models"))
        for _ in range(rounds):
            for name, tree, env in variants:
                results[name].append(_drive(tree, config, requests, env))
    finally:
        for p in (mock, sink):
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, _, _ in variants:
        rs = results[name]
        rows.append({"name": name, "cpu_ms": min(r["cpu_ms"] for r in rs), "all": [r["cpu_ms"] for r in rs],
                     "rps": max(r["rps"] for r in rs), "n": rs[0]["n"]})  # fmt: skip
    return rows, asyncio.run(_auth_cost(100_000))


def render(rows: list[dict], auth: dict[str, float], rounds: int) -> str:
    off = next(r for r in rows if r["name"] == "off")
    lines = [
        f"| tracing | CPU ms/request (best of {rounds}) | every round | − off, µs | req/s (best) | n per round |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = (r["cpu_ms"] - off["cpu_ms"]) * 1000
        rounds_txt = ", ".join(f"{x:.3f}" for x in r["all"])
        lines.append(f"| {r['name']} | {r['cpu_ms']:.3f} | {rounds_txt} | {delta:+.0f} | {r['rps']:.0f} | {r['n']} |")
    lines += ["", "| auth step | µs per request (best of 5 × 100,000) |", "|---|---|"]
    lines += [f"| {name} | {us:.2f} |" for name, us in auth.items()]
    lines.append(f"\nLoad average (1 min) at the end, other engineers' jobs included: {os.getloadavg()[0]:.1f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=Path, help="also drive the source tree of an older commit (tracing absent)")
    ap.add_argument("--write", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args()
    rows, auth = run(args.requests, args.rounds, args.before)
    table = render(rows, auth, args.rounds)
    print(table)
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        header = (
            f"\n## Tracing cost per request, off vs on; runtime-key auth — "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {platform.machine()}, {os.cpu_count()} cores "
            f"(shared, loaded), Python {platform.python_version()}, commit {commit.stdout.strip()} "
            f"(`python -m bench.tracing_cost --requests {args.requests} --rounds {args.rounds}"
            f"{' --before DIR' if args.before else ''}`)\n\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
