"""Proxy overhead against the zero-latency mock upstream, on loopback.

Measures, in one run so the ratios are comparable on a noisy shared machine:
  * proxy CPU time per request (from /proc via psutil, the proxy process only),
  * p50/p99 latency and throughput at concurrency 1, 16, 64: direct to the mock, through a bare
    pass-through (raw ASGI + one pooled aiohttp call + orjson, no policy: the floor), through the proxy,
  * streaming time to first chunk, direct vs proxied,
  * proxy RSS idle and after load.

Usage: .venv/bin/python -m bench.overhead [--seconds 4] [--write]
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
import textwrap
import time
from pathlib import Path

import aiohttp
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench"
BODY = orjson.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "Say something short about proxies."}], "max_tokens": 16}
)
STREAM_BODY = orjson.dumps(
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "stream"}], "max_tokens": 16}
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(url)


def _spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def _load(url: str, body: bytes, concurrency: int, seconds: float, headers: dict) -> dict:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: HTTP {r.status}")
                latencies.append(time.perf_counter() - t0)

        # warm-up
        async with session.post(url, data=body, headers=headers) as r:
            await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "n": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


async def _ttfc(url: str, headers: dict, n: int = 200) -> float:
    samples = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.post(url, data=STREAM_BODY, headers=headers) as r:
                async for _chunk in r.content.iter_any():
                    samples.append(time.perf_counter() - t0)
                    break
                await r.read()
    return statistics.median(samples) * 1000


def _policy(mock_url: str) -> str:
    import hashlib

    return textwrap.dedent(
        f"""\
        version: 1
        models:
          m:
            api_base: {mock_url}/v1
            upstream_model: mock
            price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
        teams:
          bench:
            keys: [sha256:{hashlib.sha256(KEY.encode()).hexdigest()}]
        """
    )


async def main_async(seconds: float, write: bool) -> None:
    mock_port, proxy_port, bare_port = _free_port(), _free_port(), _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    procs = [_spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(_policy(mock_url))
        config = f.name
    proxy = _spawn(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--config",
            config,
            "--port",
            str(proxy_port),
            "--log-level",
            "warning",
        ]
    )
    bare = _spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_passthrough:app",
            "--port",
            str(bare_port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        {"BARE_UPSTREAM": mock_url + "/v1/chat/completions"},
    )
    procs += [proxy, bare]
    try:
        await _wait(mock_url + "/v1/models")
        await _wait(f"http://127.0.0.1:{proxy_port}/healthz")
        await _wait(f"http://127.0.0.1:{bare_port}/healthz")
        pp = psutil.Process(proxy.pid)
        bp = psutil.Process(bare.pid)
        rss_idle = pp.memory_info().rss / 2**20
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        targets = {
            "direct": (mock_url + "/v1/chat/completions", {"Content-Type": "application/json"}, None),
            "bare": (f"http://127.0.0.1:{bare_port}/v1/chat/completions", {"Content-Type": "application/json"}, bp),
            "proxy": (f"http://127.0.0.1:{proxy_port}/v1/chat/completions", auth, pp),
        }
        rows = []
        for conc in (1, 16, 64):
            row = {"concurrency": conc}
            for name, (url, headers, proc) in targets.items():
                cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
                res = await _load(url, BODY, conc, seconds, headers)
                if proc:
                    res["cpu_ms_per_req"] = (sum(proc.cpu_times()[:2]) - cpu0) / (res["n"] + 1) * 1000
                row[name] = res
            rows.append(row)
        rss_load = pp.memory_info().rss / 2**20
        ttfc_direct = await _ttfc(mock_url + "/v1/chat/completions", {"Content-Type": "application/json"})
        ttfc_proxy = await _ttfc(f"http://127.0.0.1:{proxy_port}/v1/chat/completions", auth)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        os.unlink(config)

    lines = [
        "| concurrency | direct p50 / p99 ms | bare p50 / p99 ms | proxy p50 / p99 ms | added p50 ms (proxy) "
        "| direct rps | proxy rps | bare CPU ms/req | proxy CPU ms/req | proxy/bare CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, b, p = r["direct"], r["bare"], r["proxy"]
        lines.append(
            f"| {r['concurrency']} | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} | {b['p50_ms']:.3f} / {b['p99_ms']:.3f} "
            f"| {p['p50_ms']:.3f} / {p['p99_ms']:.3f} | {p['p50_ms'] - d['p50_ms']:+.3f} | {d['rps']:.0f} "
            f"| {p['rps']:.0f} | {b['cpu_ms_per_req']:.3f} | {p['cpu_ms_per_req']:.3f} "
            f"| {p['cpu_ms_per_req'] / b['cpu_ms_per_req']:.2f}x |"
        )
    lines += [
        "",
        f"Streaming time to first chunk (p50 of 200, concurrency 1): direct {ttfc_direct:.3f} ms, "
        f"proxy {ttfc_proxy:.3f} ms, added {ttfc_proxy - ttfc_direct:+.3f} ms.",
        f"Proxy RSS: idle {rss_idle:.1f} MiB, after load {rss_load:.1f} MiB.",
    ]
    table = "\n".join(lines)
    print(table)
    if write:
        header = (
            f"\n## Proxy overhead — {time.strftime('%Y-%m-%d')} — {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()} (`python -m bench.overhead --seconds {seconds:g}`)\n\n"
            "Mock upstream with zero latency on loopback; one proxy worker; the load generator shares the "
            "machine's 2 cores with all three servers, so compare columns within a row, not across runs.\n\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(header + table + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    asyncio.run(main_async(args.seconds, args.write))


if __name__ == "__main__":
    main()
