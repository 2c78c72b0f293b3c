"""CPU per request of the agent endpoints beside chat completions, through the real server, in one run.

One proxy (`serve`, one worker, memory store) in front of the zero-latency mock upstream, with a team
budget, team limits and the request log on. Per endpoint, the proxy process's CPU (psutil: user+system)
over N requests from an aiohttp loop at concurrency 8, divided by N (psutil reads CPU in 10 ms ticks:
N=1000 resolves 0.01 ms per request):

  * chat            `POST /v1/chat/completions` (the pass-through the others are compared to)
  * responses-native  `POST /v1/responses` to an `api: responses` model (bytes forwarded, model rewritten)
  * responses-chat  `POST /v1/responses` to a Chat Completions model (translated both ways)
  * messages-native `POST /v1/messages` to a `provider: anthropic` model (bytes forwarded)
  * messages-chat   `POST /v1/messages` to a Chat Completions model (translated both ways)

each non-stream and stream. Data: ../shared/data/routellm_mmlu_dev, the first N MMLU prompts as the user
turn (the same prompts for every endpoint). Rounds alternate the endpoints; the table gives the median
round and its min–max (the machine is shared: noise only ever adds CPU). wrk is not installed here, so
the load generator is Python, on the same cores: it is not counted (only the proxy's process is).

    python -m bench.agent_apis [--n 1000] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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

from bench.overhead import KEY, ROOT, _free_port, _spawn, _wait
from bench.translators import _prompts

CONCURRENCY = 8
ENDPOINTS = {
    "chat": ("/v1/chat/completions", "chat-m"),
    "responses-native": ("/v1/responses", "resp-m"),
    "responses-chat": ("/v1/responses", "chat-m"),
    "messages-native": ("/v1/messages", "claude-m"),
    "messages-chat": ("/v1/messages", "chat-m"),
}


def _policy(mock_url: str, log_path: str) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return textwrap.dedent(
        f"""\
        version: 1
        log: {{requests: {log_path}}}
        models:
          chat-m: {{api_base: {mock_url}/v1, upstream_model: mock, price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
          resp-m:
            api_base: {mock_url}/v1
            upstream_model: mock
            api: responses
            price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
          claude-m:
            provider: anthropic
            api_base: {mock_url}
            api_key: upstream
            price: {{input_per_mtok: 3, output_per_mtok: 15}}
        teams:
          bench:
            keys: [sha256:{digest}]
            budget: {{usd: 1000000000, period: day}}
            limits: {{rpm: 1000000000, tpm: 1000000000000}}
        """
    )


def _body(kind: str, model: str, prompt: str, stream: bool) -> bytes:
    if kind == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    elif kind.startswith("responses"):
        body = {"model": model, "input": prompt, "instructions": "Answer the question.", "max_output_tokens": 64}
    else:
        body = {"model": model, "system": "Answer the question.", "max_tokens": 64}
        body["messages"] = [{"role": "user", "content": prompt}]
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def _run(session: aiohttp.ClientSession, url: str, bodies: list[bytes], proc: psutil.Process) -> float:
    """Proxy CPU ms per request over `bodies`."""
    queue = list(bodies)
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}

    async def worker() -> None:
        while queue:
            body = queue.pop()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")

    cpu0 = _cpu(proc)
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return (_cpu(proc) - cpu0) / len(bodies) * 1000


async def measure(n: int, rounds: int) -> dict[tuple[str, bool], list[float]]:
    mock_port, proxy_port = _free_port(), _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    prompts = _prompts(n)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "policy.yaml"
        config.write_text(_policy(mock_url, str(Path(tmp) / "requests.jsonl")))
        mock = _spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])
        serve = ["serve", "--config", str(config), "--port", str(proxy_port), "--log-level", "warning"]
        proxy = _spawn([sys.executable, "-m", "proxy.cli", *serve])
        try:
            await _wait(f"{mock_url}/v1/models")
            await _wait(f"http://127.0.0.1:{proxy_port}/healthz")
            proc = psutil.Process(proxy.pid)
            cells = [(kind, stream) for stream in (False, True) for kind in ENDPOINTS]
            results: dict[tuple[str, bool], list[float]] = {c: [] for c in cells}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
                for kind, stream in cells:  # warm-up: imports, tokenizers, pools
                    path, model = ENDPOINTS[kind]
                    await _run(
                        session, f"http://127.0.0.1:{proxy_port}{path}", [_body(kind, model, "hi", stream)] * 50, proc
                    )
                for _ in range(rounds):
                    for kind, stream in cells:
                        path, model = ENDPOINTS[kind]
                        bodies = [_body(kind, model, p, stream) for p in prompts]
                        url = f"http://127.0.0.1:{proxy_port}{path}"
                        results[(kind, stream)].append(await _run(session, url, bodies, proc))
            return results
        finally:
            for p in (proxy, mock):
                p.terminate()
                p.wait(15)


def render(results: dict[tuple[str, bool], list[float]]) -> str:
    rows = ["| endpoint | stream | CPU ms/request (median) | min–max of rounds | × chat |", "|---|---|---|---|---|"]
    for (kind, stream), values in results.items():
        chat = statistics.median(results[("chat", stream)])
        med = statistics.median(values)
        rows.append(
            f"| {kind} | {'yes' if stream else 'no'} | {med:.3f} | {min(values):.3f}–{max(values):.3f} | "
            f"{med / chat:.2f}x |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    started = time.time()
    load0 = psutil.getloadavg()[0]
    results = asyncio.run(measure(args.n, args.rounds))
    table = render(results)
    print(table)
    if args.write:
        date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        text = (
            f"\n## Agent endpoints through the server — {date} — 2-core x86_64 shared, loaded — commit "
            f"{commit.stdout.strip()} (`python -m bench.agent_apis --n {args.n} --rounds {args.rounds}`)\n\n"
            "One proxy (one worker, memory store, team budget and limits, request log) before the zero-latency "
            "mock upstream; CPU of the proxy process per request (psutil), aiohttp client at concurrency "
            f"{CONCURRENCY} (not counted). Data: ../shared/data/routellm_mmlu_dev, the first {args.n} MMLU prompts "
            "as the user turn, the same for every endpoint; max 64 output tokens (the mock answers 32 words; a "
            f"stream is one event per word). {args.rounds} alternating rounds, n={args.n} requests per cell and "
            f"round; median round, min–max. Load average (1 min): {load0:.1f} at the start, "
            f"{psutil.getloadavg()[0]:.1f} at the end ({time.time() - started:.0f} s).\n\n"
            f"{table}\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
