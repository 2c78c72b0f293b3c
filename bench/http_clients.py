"""httpx vs aiohttp as the pooled upstream client: CPU per request of the calling process.

Both clients POST the same body to the zero-latency mock upstream at concurrency 16 for a fixed
time; the process's own CPU time divided by requests is what the proxy would pay per call.
Usage: .venv/bin/python -m bench.http_clients [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import aiohttp
import httpx
import psutil

from bench.overhead import BODY, ROOT, _free_port, _wait


async def _run(name: str, url: str, seconds: float, concurrency: int = 16) -> tuple[float, float]:
    me = psutil.Process()
    n = 0
    stop_at = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}
    if name == "aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

        async def call() -> None:
            async with session.post(url, data=BODY, headers=headers) as r:
                await r.read()

        close = session.close
    else:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency))

        async def call() -> None:
            r = await client.post(url, content=BODY, headers=headers)
            r.read()

        close = client.aclose
    await call()
    cpu0 = sum(me.cpu_times()[:2])

    async def worker() -> None:
        nonlocal n
        while time.perf_counter() < stop_at:
            await call()
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = sum(me.cpu_times()[:2]) - cpu0
    await close()
    return cpu / n * 1000, n / elapsed


async def main_async(seconds: float) -> None:
    port = _free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait(f"http://127.0.0.1:{port}/v1/models")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print("| client | CPU ms/request | requests/s |\n|---|---|---|")
        for name in ("aiohttp", "httpx", "aiohttp", "httpx"):
            cpu, rps = await _run(name, url, seconds)
            print(f"| {name} | {cpu:.3f} | {rps:.0f} |")
    finally:
        mock.terminate()
        mock.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    asyncio.run(main_async(ap.parse_args().seconds))
