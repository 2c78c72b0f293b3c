"""CPU cost per request of the budget and rate-limit steps, with the memory store and with Redis.

Three proxies in turn, same mock upstream, same load (concurrency 16, fixed time): no budget or
limits; budget + rpm/tpm limits on the embedded memory store; the same on Redis (127.0.0.1:6379).
The proxy process's CPU per request minus the baseline's is what the steps add.
Usage: .venv/bin/python -m bench.policy_steps [--seconds 4] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import sys
import tempfile
import time
import uuid

import psutil
import redis

from bench.overhead import BODY, KEY, ROOT, _free_port, _load, _spawn, _wait

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _policy(mock_url: str, with_steps: bool, prefix: str) -> str:
    team = f"    keys: [sha256:{hashlib.sha256(KEY.encode()).hexdigest()}]\n"
    if with_steps:
        team += "    budget: {usd: 1000000, period: day}\n    limits: {rpm: 100000000, tpm: 1000000000}\n"
        team += "    key_limits: {rpm: 100000000}\n"
    return (
        f"version: 1\nstore:\n  key_prefix: {prefix}\nmodels:\n  m:\n    api_base: {mock_url}/v1\n"
        f"    upstream_model: mock\n    price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}\n"
        f"teams:\n  bench:\n{team}"
    )


async def _measure(mock_url: str, policy: str, redis_url: str | None, seconds: float) -> dict:
    port = _free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(policy)
    env = {"LLM_PROXY_REDIS_URL": redis_url} if redis_url else {}
    proc = _spawn(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", f.name, "--port", str(port), "--log-level", "warning"],
        env,
    )
    try:
        await _wait(f"http://127.0.0.1:{port}/healthz")
        p = psutil.Process(proc.pid)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        await _load(f"http://127.0.0.1:{port}/v1/chat/completions", BODY, 4, 0.5, headers)  # warm up
        cpu0 = sum(p.cpu_times()[:2])
        res = await _load(f"http://127.0.0.1:{port}/v1/chat/completions", BODY, 16, seconds, headers)
        res["cpu_ms_per_req"] = (sum(p.cpu_times()[:2]) - cpu0) / (res["n"] + 1) * 1000
        return res
    finally:
        proc.terminate()
        proc.wait(10)
        os.unlink(f.name)


async def main_async(seconds: float, write: bool) -> None:
    mock_port = _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = _spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])
    prefix = f"llmpbench{uuid.uuid4().hex[:6]}"
    try:
        await _wait(mock_url + "/v1/models")
        runs = {}
        for _ in range(2):  # two alternating rounds: the machine is noisy
            for name, steps, url in (("baseline", False, None), ("memory", True, None), ("redis", True, REDIS_URL)):
                r = await _measure(mock_url, _policy(mock_url, steps, prefix), url, seconds)
                runs.setdefault(name, []).append(r)
    finally:
        mock.terminate()
        mock.wait(10)
        client = redis.Redis.from_url(REDIS_URL)
        for k in client.scan_iter(f"{prefix}:*"):
            client.delete(k)
        client.close()
    best = {name: min(rs, key=lambda r: r["cpu_ms_per_req"]) for name, rs in runs.items()}
    base = best["baseline"]["cpu_ms_per_req"]
    lines = [
        "| store | proxy CPU ms/req (best of 2) | added by budget + limits ms/req | p50 ms | rps |",
        "|---|---|---|---|---|",
    ]
    for name in ("baseline", "memory", "redis"):
        r = best[name]
        added = "—" if name == "baseline" else f"{r['cpu_ms_per_req'] - base:+.3f}"
        lines.append(f"| {name} | {r['cpu_ms_per_req']:.3f} | {added} | {r['p50_ms']:.2f} | {r['rps']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(
                f"\n## Budget + rate-limit steps — {time.strftime('%Y-%m-%d')} — {platform.machine()}, "
                f"{os.cpu_count()} cores (`python -m bench.policy_steps --seconds {seconds:g}`)\n\n"
                "Concurrency 16 against the zero-latency mock; team budget, team rpm/tpm and key rpm limits. "
                "Redis is the local server on loopback; its own CPU is not counted.\n\n" + table + "\n"
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    asyncio.run(main_async(args.seconds, args.write))
