"""How long a revoked runtime key keeps working: three proxies on one Redis, a key made on one, revoked on
another, each replica polled (a request every ~5 ms) until it refuses the key. Also: whether a new key
works on the first request to a replica that has never seen it.

The design under test: each replica keeps every runtime key in memory and polls one version counter in
Redis every 250 ms, off the request path (4 GETs a second per replica, whatever the traffic), so the
expected delay is 0-250 ms plus one reload.

Usage: .venv/bin/python -m bench.key_revocation [--trials 20] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

from bench.overhead import ROOT, _free_port, _spawn, _wait

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MASTER = "sk-bench-master"
ADMIN = {"Authorization": f"Bearer {MASTER}"}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def _policy(mock_url: str, prefix: str) -> str:
    return f"""\
version: 1
store: {{key_prefix: {prefix}}}
models:
  m: {{api_base: "{mock_url}/v1", upstream_model: mock, price: {{input_per_mtok: 1, output_per_mtok: 1}}}}
teams:
  bench: {{models: ["*"]}}
"""


def _status(client: httpx.Client, url: str, key: str) -> int:
    return client.post(url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}).status_code


def run(trials: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="revocation-"))
    prefix = f"llmpbench{uuid.uuid4().hex[:6]}"
    mock_port = _free_port()
    mock = _spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])
    config = tmp / "policy.yaml"
    config.write_text(_policy(f"http://127.0.0.1:{mock_port}", prefix))
    env = {**os.environ, "LLM_PROXY_REDIS_URL": REDIS_URL, "LLM_PROXY_MASTER_KEY": MASTER}
    ports = [_free_port() for _ in range(3)]
    serve = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--log-level", "warning"]
    procs = [
        subprocess.Popen(
            [*serve, "--port", str(p)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for p in ports
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    delays: list[float] = []
    first_ok = first_total = 0
    try:
        asyncio.run(_wait(f"http://127.0.0.1:{mock_port}/v1/models"))
        for u in urls:
            asyncio.run(_wait(u + "/healthz", timeout=120))
        with httpx.Client(timeout=30) as client:
            for i in range(trials):
                made = client.post(urls[i % 3] + "/admin/keys", json={"team": "bench", "name": f"t{i}"}, headers=ADMIN)
                made.raise_for_status()
                key, key_id = made.json()["key"], made.json()["id"]
                for u in urls:  # the first request to each replica, which has not seen the key yet
                    first_total += 1
                    first_ok += _status(client, u, key) == 200
                client.delete(urls[(i + 1) % 3] + f"/admin/keys/{key_id}", headers=ADMIN).raise_for_status()
                revoked = time.perf_counter()
                pending = set(urls)
                while pending:
                    for u in list(pending):
                        if _status(client, u, key) == 401:
                            pending.discard(u)
                            delays.append(time.perf_counter() - revoked)
                    time.sleep(0.005)  # a client retrying: the measurement's resolution
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        mock.terminate()
        mock.wait(10)
        client = redis.Redis.from_url(REDIS_URL)
        for k in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(k)
        client.close()
    delays.sort()
    return {
        "n": len(delays),
        "median_ms": statistics.median(delays) * 1000,
        "p90_ms": delays[int(0.9 * (len(delays) - 1))] * 1000,
        "max_ms": delays[-1] * 1000,
        "first_ok": first_ok,
        "first_total": first_total,
    }


def render(r: dict, trials: int) -> str:
    return "\n".join(
        [
            "| revocation → refused, per replica | n | median ms | p90 ms | max ms "
            "| first request on an unseen replica |",
            "|---|---|---|---|---|---|",
            f"| 3 replicas, poll every 250 ms | {r['n']} ({trials} keys × 3) | {r['median_ms']:.0f} "
            f"| {r['p90_ms']:.0f} | {r['max_ms']:.0f} | {r['first_ok']}/{r['first_total']} answered 200 |",
            f"\nLoad average (1 min) at the end, other engineers' jobs included: {os.getloadavg()[0]:.1f}.",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    table = render(run(args.trials), args.trials)
    print(table)
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        header = (
            f"\n## Runtime key revocation across replicas — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
            f"{platform.machine()}, {os.cpu_count()} cores (shared, loaded), Python {platform.python_version()}, "
            f"commit {commit.stdout.strip()}, real Redis (`python -m bench.key_revocation --trials {args.trials}`)\n\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
