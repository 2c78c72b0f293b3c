"""The proxy's hot path with every step on, next to the bare pass-through floor, in one run.

Policy: auth with a virtual key, team and key budgets, team rpm/tpm and key rpm limits, a `reject`
policy that does not match, a `set` policy (clamp max_tokens), a `route` policy (cost multiple), a
`concise` policy with a hold-out arm, the request log, and metrics. Against the zero-latency mock
upstream, for the memory store and Redis, non-stream and stream:

  * CPU per request of the server process (psutil; every worker's with --workers N),
  * requests/s at concurrency 16, p99 at concurrency 64,
  * idle RSS and RSS after load,
  * optionally (--workers-scaling) Redis-store throughput with `serve --workers 1` vs `--workers 2`.

Load comes from `wrk` (one thread, a lua script for the POST body): it costs a fraction of a Python
load generator's CPU, which matters on a 2-core machine where load generator, mock upstream and the
server under test share the cores. Rounds alternate the servers; CPU is the best round, as the machine
is shared and noise only ever adds CPU.

Usage: .venv/bin/python -m bench.hot_path [--seconds 5] [--rounds 2] [--workers-scaling] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import psutil
import redis

from bench.overhead import KEY, ROOT, _free_port, _spawn, _wait
from bench.results import append_section, short_commit

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
_MESSAGES = [{"role": "user", "content": "Say something short about proxies and why they help."}]
BODY = orjson.dumps({"model": "m", "messages": _MESSAGES, "max_tokens": 64})
STREAM_BODY = orjson.dumps({"model": "m", "messages": _MESSAGES, "max_tokens": 64, "stream": True})


def full_policy(mock_url: str, prefix: str, log_path: str) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""\
version: 1
store: {{key_prefix: {prefix}}}
log: {{requests: {log_path}}}
models:
  m:
    api_base: {mock_url}/v1
    upstream_model: mock
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
  m-mini:
    api_base: {mock_url}/v1
    upstream_model: mock-mini
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
teams:
  bench:
    keys: [sha256:{digest}]
    models: ["*"]
    budget: {{usd: 1000000000, period: day}}
    key_budget: {{usd: 1000000000, period: day}}
    limits: {{rpm: 1000000000, tpm: 1000000000000}}
    key_limits: {{rpm: 1000000000}}
tasks:
  summarize: {{patterns: ["(?i)summari[sz]e", "(?i)tl;?dr"]}}
policies:
  - name: no-internal
    when: {{headers: {{x-internal-only: "yes"}}}}
    reject: {{message: "internal only", status: 403}}
  - name: cap-output
    set: {{max_tokens: {{max: 512, default: 256}}}}
  - name: cheap-summaries
    when: {{task: summarize}}
    route: {{to: m-mini}}
  - name: by-cost
    when: {{models: ["m"]}}
    route: {{to: m-mini, min_cost_multiple: 5}}
  - name: be-concise
    concise: {{instruction: "Be concise.", holdout: 0.05}}
"""


def _lua(body: bytes, auth: bool) -> str:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [==[{body.decode()}]==]",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if auth:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {KEY}"')
    return "\n".join(lines) + "\n"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if m is None:
        raise ValueError(value)
    return float(m.group(1)) * _UNITS[m.group(2)]


def _tree_cpu(pid: int) -> float:
    """User+system CPU seconds of a process and its children (uvicorn's workers)."""
    p = psutil.Process(pid)
    total = 0.0
    for proc in [p, *p.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _tree_rss(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(proc.memory_info().rss for proc in [p, *p.children(recursive=True)]) / 2**20


def wrk(url: str, script: str, concurrency: int, seconds: float, pid: int | None) -> dict:
    cpu0 = _tree_cpu(pid) if pid else 0.0
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = _tree_cpu(pid) - cpu0 if pid else 0.0
    n = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        raise RuntimeError(f"{url}: wrk saw failures:\n{out}")
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M))
    if "99" not in pct:
        raise RuntimeError(f"{url}: no latency distribution in wrk's output:\n{out}")
    return {
        "n": n,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "cpu_ms_per_req": cpu / max(1, n) * 1000,
    }


class Target:
    def __init__(self, name: str, args: list[str], env: dict[str, str], auth: bool, cwd: Path = ROOT):
        self.name, self.args, self.env, self.auth, self.cwd = name, args, env, auth, cwd
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.rss_idle = self.rss_load = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.args, "--port", str(self.port)],
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await _wait(f"http://127.0.0.1:{self.port}/healthz")
        time.sleep(0.5)  # let the workers finish importing before the idle RSS is read
        self.rss_idle = _tree_rss(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.rss_load = _tree_rss(self.proc.pid)
            self.proc.terminate()
            self.proc.wait(15)


def _proxy_args(config: str, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "serve", "--config", config, "--log-level", "warning"] + (
        ["--workers", str(workers)] if workers > 1 else []
    )


async def run(
    seconds: float, rounds: int, scaling: bool, before: Path | None, only: set[str] | None = None
) -> tuple[list[dict], dict, dict]:
    tmp = Path(tempfile.mkdtemp(prefix="hotpath-"))
    mock_port = _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = _spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])
    prefix = f"llmpbench{uuid.uuid4().hex[:6]}"
    config = tmp / "policy.yaml"
    config.write_text(full_policy(mock_url, prefix, str(tmp / "requests.jsonl")))
    scripts = {}
    for kind, body in (("plain", BODY), ("stream", STREAM_BODY)):
        for auth in (False, True):
            path = tmp / f"{kind}-{auth}.lua"
            path.write_text(_lua(body, auth))
            scripts[kind, auth] = str(path)
    targets = [
        Target("bare", [sys.executable, "-m", "uvicorn", "bench.bare_passthrough:app", "--loop", "uvloop",
                        "--http", "httptools", "--no-access-log", "--log-level", "warning"],
               {"BARE_UPSTREAM": mock_url + "/v1/chat/completions"}, False),
        Target("memory", _proxy_args(str(config)), {}, True),
        Target("redis", _proxy_args(str(config)), {"LLM_PROXY_REDIS_URL": REDIS_URL}, True),
    ]  # fmt: skip
    if before is not None:  # the same proxy from another source tree (e.g. `git archive <commit>`), same run
        targets += [
            Target("memory, before", _proxy_args(str(config)), {}, True, before),
            Target("redis, before", _proxy_args(str(config)), {"LLM_PROXY_REDIS_URL": REDIS_URL}, True, before),
        ]
    if only:  # the bare floor always stays: every ratio is to it
        targets = [t for t in targets if t.name == "bare" or t.name in only]
    results: dict[str, dict[str, list[dict]]] = {t.name: {} for t in targets}
    scaling_rows: dict = {}
    try:
        await _wait(mock_url + "/v1/models")
        for t in targets:
            await t.start()
        for _ in range(rounds):
            for t in targets:
                pid = t.proc.pid
                wrk(t.url, scripts["plain", t.auth], 16, 1, pid)  # warm up
                cells = {
                    "plain16": wrk(t.url, scripts["plain", t.auth], 16, seconds, pid),
                    "plain64": wrk(t.url, scripts["plain", t.auth], 64, seconds, pid),
                    "stream16": wrk(t.url, scripts["stream", t.auth], 16, seconds, pid),
                }
                for cell, res in cells.items():
                    results[t.name].setdefault(cell, []).append(res)
        for t in targets:
            t.stop()
        if scaling:
            for workers in (1, 2, 1, 2):
                s = Target(f"redis-w{workers}", _proxy_args(str(config), workers), {"LLM_PROXY_REDIS_URL": REDIS_URL},
                           True)  # fmt: skip
                await s.start()
                try:
                    wrk(s.url, scripts["plain", True], 32, 1, s.proc.pid)
                    res = wrk(s.url, scripts["plain", True], 32, seconds, s.proc.pid)
                finally:
                    s.stop()
                scaling_rows.setdefault(workers, []).append(res)
    finally:
        for t in targets:
            if t.proc is not None and t.proc.poll() is None:
                t.stop()
        mock.terminate()
        mock.wait(10)
        client = redis.Redis.from_url(REDIS_URL)
        for k in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(k)
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for t in targets:
        cells = results[t.name]
        rows.append(
            {
                "name": t.name,
                "cpu_plain": min(r["cpu_ms_per_req"] for r in cells["plain16"]),
                "rps16": max(r["rps"] for r in cells["plain16"]),
                "p99_64": min(r["p99_ms"] for r in cells["plain64"]),
                "rps64": max(r["rps"] for r in cells["plain64"]),
                "cpu_stream": min(r["cpu_ms_per_req"] for r in cells["stream16"]),
                "rps_stream": max(r["rps"] for r in cells["stream16"]),
                "rss_idle": t.rss_idle,
                "rss_load": t.rss_load,
            }
        )
    return rows, scaling_rows, {"load_end": os.getloadavg()[0]}


def render(rows: list[dict], scaling: dict, extra: dict) -> str:
    bare = rows[0]
    lines = [
        "| server | CPU ms/req (non-stream, c=16) | × bare | rps c=16 | p99 ms c=64 | rps c=64 "
        "| CPU ms/req (stream, c=16) | × bare | stream rps c=16 | RSS idle / after load MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['cpu_plain']:.3f} | {r['cpu_plain'] / bare['cpu_plain']:.2f}x | {r['rps16']:.0f} "
            f"| {r['p99_64']:.2f} | {r['rps64']:.0f} | {r['cpu_stream']:.3f} "
            f"| {r['cpu_stream'] / bare['cpu_stream']:.2f}x | {r['rps_stream']:.0f} "
            f"| {r['rss_idle']:.1f} / {r['rss_load']:.1f} |"
        )
    if scaling:
        one = max(r["rps"] for r in scaling[1])
        lines += ["", "| Redis store, c=32 | rps (best of 2) | CPU ms/req (all workers) | × --workers 1 rps |",
                  "|---|---|---|---|"]  # fmt: skip
        for w, rs in sorted(scaling.items()):
            best = max(rs, key=lambda r: r["rps"])
            lines.append(
                f"| --workers {w} | {best['rps']:.0f} | {best['cpu_ms_per_req']:.3f} | {best['rps'] / one:.2f}x |"
            )
    lines.append(f"\nLoad average (1 min) at the end, other engineers' jobs included: {extra['load_end']:.1f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers-scaling", action="store_true")
    ap.add_argument("--before", type=Path, help="also run the proxy from this source tree (an older commit)")
    ap.add_argument("--only", help="servers to run besides the bare floor, ';'-separated, e.g. 'redis;redis, before'")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    only = {name.strip() for name in args.only.split(";")} if args.only else None
    rows, scaling, extra = asyncio.run(run(args.seconds, args.rounds, args.workers_scaling, args.before, only))
    table = render(rows, scaling, extra)
    print(table)
    if args.write:
        header = (
            f"\n## Hot path, every step on — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, commit "
            f"{short_commit()} (`python -m bench.hot_path --seconds {args.seconds:g} --rounds {args.rounds}"
            f"{' --workers-scaling' if args.workers_scaling else ''}`)\n\n"
        )
        append_section(header + table)


if __name__ == "__main__":
    main()
