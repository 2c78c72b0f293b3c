"""Where a retrieval hit's time goes: the local embedding (called directly, and through the worker
thread as the proxy calls it), and a hit end to end through the proxy (client-measured, and the proxy's
own `x-llm-proxy-overhead-ms`), for a paraphrase (embedding + index + guards + verifier) and an exact
match (no embedding); and the proxy's resident memory with retrieval on (the model loaded, the FAQ collection
indexed) before and after those hits. Loopback only, the memory store, sequential requests.

    python -m bench.retrieval_latency [--requests 100] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import psutil

from bench.results import report, short_commit
from bench.retrieval_eval import KEY, MASTER, ROOT, _free_port, faq_policy, load_faq_when_ready
from proxy.retrieval.embedders import LocalModel

VERIFIER = ROOT / "policies" / "verifiers" / "all-MiniLM-L6-v2.json"
QUESTIONS = [f"Who's the author of Hamlet, act {i}?" for i in range(50)]


def _p(ts: list[float], q: float) -> float:
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(len(ts) * q))]


async def _through_thread(model: LocalModel, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        await model.encode([QUESTIONS[i % len(QUESTIONS)]])
        out.append((time.perf_counter() - t) * 1000)
    return out


def embedding(n: int) -> dict[str, list[float]]:
    model = LocalModel(None, 1)
    model.load_blocking()
    direct: list[float] = []
    hop: list[float] = []
    for _ in range(3):  # interleaved rounds: the machine's load drifts
        for i in range(n // 3):
            t = time.perf_counter()
            model.encode_blocking([QUESTIONS[i % len(QUESTIONS)]])
            direct.append((time.perf_counter() - t) * 1000)
        hop += asyncio.run(_through_thread(model, n // 3))
    return {"encode, called directly": direct, "encode through the worker thread": hop}


async def _hits(url: str, n: int) -> dict[str, tuple[list[float], list[float]]]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    out: dict[str, tuple[list[float], list[float]]] = {}
    async with aiohttp.ClientSession() as s:
        for label, question in (("paraphrase", "Who's the author of Hamlet?"), ("exact", "who wrote hamlet")):
            body = orjson.dumps({"model": "big", "messages": [{"role": "user", "content": question}]})
            client, server = [], []
            for i in range(n + 10):
                t = time.perf_counter()
                async with s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    assert r.headers.get("x-llm-proxy-route") == "retrieval", (label, dict(r.headers))
                    overhead = float(r.headers["x-llm-proxy-overhead-ms"])
                if i >= 10:
                    client.append((time.perf_counter() - t) * 1000)
                    server.append(overhead)
            out[label] = (client, server)
    return out


def through_proxy(n: int) -> tuple[dict[str, tuple[list[float], list[float]]], tuple[float, float]]:
    """The hits' latencies, and the proxy's RSS in MiB once ready (idle) and after the hits."""
    tmp = Path(tempfile.mkdtemp())
    mock_port, proxy_port = _free_port(), _free_port()
    policy = tmp / "policy.yaml"
    policy.write_text(faq_policy(mock_port, f"verifier: {VERIFIER}"))
    env = {**os.environ, "LLM_PROXY_MASTER_KEY": MASTER}
    env.pop("LLM_PROXY_REDIS_URL", None)
    serve = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(policy), "--port", str(proxy_port)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)], cwd=ROOT),
        subprocess.Popen([*serve, "--log-level", "warning"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL),
    ]
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        load_faq_when_ready(url, timeout_s=180)
        proxy = psutil.Process(procs[1].pid)
        idle = proxy.memory_info().rss / 2**20
        hits = asyncio.run(_hits(url, n))
        return hits, (idle, proxy.memory_info().rss / 2**20)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    rows = ["| what | n | p50 ms | p95 ms |", "|---|---|---|---|"]
    for label, ts in embedding(args.requests).items():
        rows.append(
            f"| {label} (in process, one short question) | {len(ts)} | {_p(ts, 0.5):.1f} | {_p(ts, 0.95):.1f} |"
        )
    hits, (idle_mib, after_mib) = through_proxy(args.requests)
    for label, (client, server) in hits.items():
        rows.append(
            f"| {label} hit, client end to end | {len(client)} | {_p(client, 0.5):.1f} | {_p(client, 0.95):.1f} |"
        )
        rows.append(
            f"| {label} hit, inside the proxy (overhead header) | {len(server)} "
            f"| {_p(server, 0.5):.1f} | {_p(server, 0.95):.1f} |"
        )
    head = (
        f"## Retrieval hit latency, where it goes — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
        f"{platform.machine()}, 2-core shared VM (load average {load:.1f} at start); Python "
        f"{platform.python_version()}; commit {short_commit()} (`python -m bench.retrieval_latency "
        f"{' '.join(sys.argv[1:])}`, {time.perf_counter() - started:.0f} s)"
    )
    memory = (
        f"Proxy resident memory with retrieval on (one process, torch and all-MiniLM-L6-v2 loaded, the FAQ "
        f"collection indexed): {idle_mib:.0f} MiB idle, {after_mib:.0f} MiB after the {2 * (args.requests + 10)} hits."
    )
    text = "\n".join([head, "", *rows, "", memory, ""])
    report(text, args.write)


if __name__ == "__main__":
    main()
