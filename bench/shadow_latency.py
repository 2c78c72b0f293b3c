"""Shadow evaluation and client latency: the same requests through a proxy with shadow evaluation off and
one with it on at `--rate` (1.0: every routed request gets a counterfactual call and two judge calls, in the
background; the default policy rate is 0.02), in alternating rounds of one run, against the mock upstream
with a fixed latency.

Client latency is wall time per request at the client (sequential requests, one connection); proxy
overhead is the proxy's own `x-llm-proxy-overhead-ms`. After an "on" round the benchmark waits for the
shadow queue to drain, so each round of the other arm starts on an idle proxy.

Data: ../shared/data/routellm_mmlu_dev, the first N MMLU prompts as the user turn.

Usage: .venv/bin/python -m bench.shadow_latency [--n 100] [--rounds 5] [--latency-ms 20] [--rate 1.0] [--write]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

from bench.results import append_section, short_commit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "routellm_mmlu_dev"
KEY = "sk-bench-shadow"


def _prompts(n: int) -> list[str]:
    prompts: list[str] = []
    for path in sorted(DATA.glob("mmlu_*.csv")):
        with path.open(newline="") as f:
            prompts += [row["prompt"] for row in csv.DictReader(f)]
        if len(prompts) >= n:
            break
    return prompts[:n]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _policy(mock: str, shadow: bool, rate: float) -> str:
    up = f"api_base: {mock}/v1"
    evaluation = "evaluation: {judge: judge, budget_usd_per_day: 1000, queue: 10000, workers: 2}\n" if shadow else ""
    return (
        textwrap.dedent(
            f"""\
            version: 1
            models:
              big: {{{up}, upstream_model: bench-big, price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
              small: {{{up}, upstream_model: bench-small, price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}}}
              judge: {{{up}, upstream_model: bench-judge, price: {{input_per_mtok: 1, output_per_mtok: 4}}}}
            teams:
              bench: {{keys: [{KEY}]}}
            """
        )
        + evaluation
        + "policies:\n  - name: cheap\n    route: {to: small}\n"
        + (f"    shadow: {{rate: {rate:g}}}\n" if shadow else "")
    )


def _start(args: list[str], port: int, health: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_REDIS_URL"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)  # the port is not open yet: nothing to wait on but the port
    proc.kill()
    raise RuntimeError(f"{args} did not start: {log.read_text()[-2000:]}")


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _round(client: httpx.Client, url: str, prompts: list[str]) -> tuple[list[float], list[float]]:
    latency, overhead = [], []
    for p in prompts:
        body = {"model": "big", "messages": [{"role": "user", "content": p}], "max_tokens": 32}
        start = time.perf_counter()
        r = client.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        latency.append((time.perf_counter() - start) * 1e3)
        r.raise_for_status()
        assert r.headers["x-llm-proxy-model"] == "small"
        overhead.append(float(r.headers["x-llm-proxy-overhead-ms"]))
    return latency, overhead


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="requests per round and arm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="the mock upstream's latency per call")
    ap.add_argument("--rate", type=float, default=1.0, help="the shadow sampling rate of the on arm")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    prompts = _prompts(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    procs = []
    try:
        mport = _free_port()
        mock = f"http://127.0.0.1:{mport}"
        cmd = ["mock-upstream", "--port", str(mport), "--latency-ms", str(args.latency_ms)]
        procs.append(_start(cmd, mport, "/v1/models", tmp / "mock.log"))
        httpx.post(mock + "/mock/config", json={"judge": "tie"}).raise_for_status()
        urls = {}
        for arm, shadow in (("off", False), ("on", True)):
            port = _free_port()
            config = tmp / f"{arm}.yaml"
            config.write_text(_policy(mock, shadow, args.rate))
            serve = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
            procs.append(_start(serve, port, "/healthz", tmp / f"{arm}.log"))
            urls[arm] = f"http://127.0.0.1:{port}"
        results: dict[str, dict[str, list[float]]] = {a: {"latency": [], "overhead": [], "p50": []} for a in urls}
        with httpx.Client(timeout=30) as client:
            for url in urls.values():  # warm both (tokenizer, connections) before measuring
                _round(client, url, prompts[:10])
            for i in range(args.rounds):
                order = ("off", "on") if i % 2 == 0 else ("on", "off")  # alternate which arm goes first
                for arm in order:
                    latency, overhead = _round(client, urls[arm], prompts)
                    results[arm]["latency"] += latency
                    results[arm]["overhead"] += overhead
                    results[arm]["p50"].append(statistics.median(latency))
                    if arm == "on":  # let the background work finish before the next round
                        deadline = time.monotonic() + 300
                        while _metric(urls["on"], "llm_proxy_shadow_queue_depth") > 0 and time.monotonic() < deadline:
                            time.sleep(0.2)  # polling another process's metric
        judged = _metric(urls["on"], "llm_proxy_shadow_judgements_total")
        dropped = _metric(urls["on"], "llm_proxy_shadow_dropped_total")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    rows = []
    off = results["off"]
    for arm in ("off", "on"):
        r = results[arm]
        ratios = [a / b for a, b in zip(r["p50"], off["p50"], strict=True)]
        rows.append(
            f"| {arm} | {len(r['latency'])} | {statistics.median(r['latency']):.2f} | {_pct(r['latency'], 0.95):.2f} "
            f"| {statistics.median(r['overhead']):.3f} | {_pct(r['overhead'], 0.95):.3f} "
            f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |"
        )
    table = (
        "| shadow | n | client p50 ms | client p95 ms | overhead p50 ms | overhead p95 ms "
        "| round p50 ÷ off (median, min–max of rounds) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    print(f"shadow comparisons judged: {judged:.0f}, dropped: {dropped:.0f}")
    if args.write:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load = os.getloadavg()[0]
        append_section(
            f"## Shadow evaluation and client latency — {date} — 2-core x86_64 shared, loaded — "
            f"commit {short_commit()} "
            f"(`python -m bench.shadow_latency --n {args.n} --rounds {args.rounds} "
            f"--latency-ms {args.latency_ms:g} --rate {args.rate:g}`)"
            f"\n\nData: ../shared/data/routellm_mmlu_dev, the first {len(prompts)} MMLU prompts as the user turn, "
            f"`max_tokens: 32`, sent one at a time (one connection) to `big`, routed to `small`; the mock "
            f"upstream answers every call after {args.latency_ms:g} ms. Off: no `evaluation:`; on: `shadow: "
            f"{{rate: {args.rate:g}}}` (each sampled request costs three more upstream calls in the background: the "
            f"counterfactual and two judge calls), 2 workers. {args.rounds} rounds per arm, alternating which arm "
            f"goes first; after an on round the queue drains before the next round. Judged: {judged:.0f}, "
            f"dropped: {dropped:.0f}. Load average (1 min) at the end: {load:.1f}.\n\n" + table
        )


if __name__ == "__main__":
    main()
