"""Side by side with the other gateways, in one run: this proxy with its memory store and with its Redis
store, Portkey's gateway (Node) and the LiteLLM proxy, one process each, in front of the same zero-latency
mock upstream on loopback, measured in rotating turns so drift on the shared machine hits all alike.

Per mode (non-stream, stream) and concurrency (1/16/64; 1/16 with --quick): p50/p99 added to a direct call
to the mock, throughput, and each gateway's CPU per request (process tree, psutil, read once the CPU has
settled, divided by the calls the mock received: the exact number of requests the gateway handled).
Also: time to first chunk added to a direct stream, RSS idle and after load, and startup time
(spawn → first 200 on a real chat completion). The first table is the summary: one row per gateway.

The first run installs litellm[proxy] into bench/.peers-venv and @portkey-ai/gateway into
bench/.peers/portkey (both git-ignored). Load comes from wrk when installed (apt-get install -y wrk): at
concurrency 16/64 bench.overhead's aiohttp generator spends about as much CPU per request as this proxy
does, on the same 2 cores (`--loadgen python` shows it). Redis: $BENCH_REDIS_URL or 127.0.0.1:6379/0,
under a key prefix of its own, removed at the end.

Usage: .venv/bin/python -m bench.peers [--quick] [--seconds 5] [--rounds 2] [--startup-rounds 3]
       [--peers ours,ours-redis,portkey,litellm] [--loadgen wrk] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil
import redis

from bench import litellm_peer, portkey_peer
from bench.overhead import BODY, KEY, ROOT, STREAM_BODY, _free_port, _load, _policy, _ttfc, _wait
from bench.wrk_load import run_wrk, wrk_path

MODES = {"non-stream": BODY, "stream": STREAM_BODY}
PEERS = ("ours", "ours-redis", "portkey", "litellm")
# Not in the default set: the same app (memory store) served by granian instead of uvicorn, for
# `--peers ours,ours-granian` (granian importable, e.g. PYTHONPATH=bench/.peers/onnx-site).
OPTIONAL = ("ours-granian",)
LABELS = {
    "ours": "ours, memory store",
    "ours-granian": "ours, memory store, on granian",
    "ours-redis": "ours, Redis store",
    "portkey": f"Portkey gateway {portkey_peer.GATEWAY_VERSION}",
    "litellm": f"LiteLLM {litellm_peer.LITELLM_VERSION}",
}
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
UPSTREAM_KEY = "sk-mock-upstream"
# --quick: about four minutes on the 2-core VM with all four peers (LiteLLM's startup is most of the rest).
QUICK = dict(seconds=3.0, rounds=2, startup_rounds=1, ttft_samples=40, warm_up=20, concurrencies="1,16")
FULL = dict(seconds=5.0, rounds=2, startup_rounds=3, ttft_samples=100, warm_up=30, concurrencies="1,16,64")
_JSON = {"Content-Type": "application/json"}
_AUTH = {**_JSON, "Authorization": f"Bearer {KEY}"}
README_START, README_END = "<!-- bench.peers summary: start -->", "<!-- bench.peers summary: end -->"


@dataclass
class Server:
    name: str
    args: list[str]
    env: dict[str, str]
    port: int
    log: Path
    headers: dict[str, str]
    proc: subprocess.Popen | None = None
    startup_s: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    # LiteLLM may fork workers or helpers; the bill is the whole tree's.
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _tree_cpu(proc: subprocess.Popen) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in _tree(proc))


def _tree_rss_mib(proc: subprocess.Popen) -> float:
    return sum(p.memory_info().rss for p in _tree(proc)) / 2**20


async def _settled_cpu(proc: subprocess.Popen, limit_s: float = 30.0) -> float:
    """CPU once requests the load generator left in flight at its deadline have finished (a saturated
    LiteLLM takes seconds to drain 64), so none of their work lands in the next peer's turn."""
    last = _tree_cpu(proc)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = _tree_cpu(proc)
        if now - last < 0.005:
            return now
        last = now
    return last


def _redis_cpu_s(client: redis.Redis) -> float:
    """The Redis server's own CPU (INFO cpu): the store's share of the bill. The server is shared with other
    work on this machine, so this is an upper bound."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _upstream_calls(mock_url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(mock_url + "/mock/stats") as r:
        calls = (await r.json())["calls"]
    return sum(v for k, v in calls.items() if k.endswith("chat/completions"))


def _log_tail(server: Server) -> str:
    try:
        return server.log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


async def _start(server: Server, timeout_s: float = 180) -> None:
    """Spawn, then POST a real request every 20 ms until the first 200: the startup a client sees."""
    t0 = time.perf_counter()
    with open(server.log, "ab") as log:
        server.proc = subprocess.Popen(server.args, cwd=ROOT, env=server.env, stdout=log, stderr=log)
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < timeout_s:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{_log_tail(server)}")
            try:
                async with s.post(server.url, data=BODY, headers=server.headers) as r:
                    await r.read()
                    if r.status == 200:
                        server.startup_s.append(time.perf_counter() - t0)
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError(f"{server.name}: no 200 within {timeout_s:g} s:\n{_log_tail(server)}")


def _stop(server: Server) -> None:
    if server.proc is None:
        return
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)
    server.proc = None


async def _reply_text(url: str, headers: dict, stream: bool) -> str:
    async with aiohttp.ClientSession() as s, s.post(url, data=STREAM_BODY if stream else BODY, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.text())[:300]}")
        if not stream:
            return (await r.json())["choices"][0]["message"]["content"]
        text = []
        async for line in r.content:
            if line.startswith(b"data: {"):
                for choice in orjson.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
        return "".join(text)


async def _check_same_answers(direct_url: str, servers: dict[str, Server]) -> None:
    """Every peer must relay the mock's answer unchanged, streamed and not, or the comparison is void."""
    for stream in (False, True):
        want = await _reply_text(direct_url, _JSON, stream)
        for server in servers.values():
            got = await _reply_text(server.url, server.headers, stream)
            if got != want:
                raise RuntimeError(f"{server.name} (stream={stream}) answered {got!r}, the mock said {want!r}")


async def _warm_up(servers: dict[str, Server], n: int) -> None:
    """The peers import lazily on first use (and Node compiles hot code); steady state is what is measured."""
    async with aiohttp.ClientSession() as s:
        for server in servers.values():
            for body in MODES.values():
                for _ in range(n):
                    async with s.post(server.url, data=body, headers=server.headers) as r:
                        await r.read()


async def _run_load(url: str, headers: dict, body: bytes, concurrency: int, seconds: float, loadgen: str) -> dict:
    if loadgen == "wrk":
        res = run_wrk(url, body, headers, concurrency, seconds)
    else:
        me = psutil.Process()
        cpu0 = sum(me.cpu_times()[:2])
        res = await _load(url, body, concurrency, seconds, headers)
        res |= {"errors": 0, "loadgen_cpu_s": sum(me.cpu_times()[:2]) - cpu0}
    res["duration_s"] = res["n"] / res["rps"] if res["n"] else seconds
    if not res["n"]:  # no request finished in the window: no latency to report
        res["p50_ms"] = res["p99_ms"] = float("nan")
    return res


@dataclass
class Run:
    """Everything one bench.peers run shares: the mock, the peers, the Redis client, the options."""

    mock_url: str
    servers: dict[str, Server]
    redis: redis.Redis
    args: argparse.Namespace

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(self.servers)

    def endpoint(self, target: str) -> tuple[str, dict]:
        if target in self.servers:
            return self.servers[target].url, self.servers[target].headers
        return self.mock_url + "/v1/chat/completions", _JSON

    def turns(self, i: int) -> tuple[str, ...]:
        """Rotate the order: over len(peers) turns each peer goes in every position once."""
        k = i % len(self.peers)
        return self.peers[k:] + self.peers[:k]


async def _measure(run: Run, target: str, body: bytes, concurrency: int) -> dict:
    server = run.servers.get(target)
    url, headers = run.endpoint(target)
    calls0 = await _upstream_calls(run.mock_url)
    cpu0 = _tree_cpu(server.proc) if server else 0.0
    redis0 = _redis_cpu_s(run.redis) if target == "ours-redis" else 0.0
    res = await _run_load(url, headers, body, concurrency, run.args.seconds, run.args.loadgen)
    if server:
        res["cpu_s"] = await _settled_cpu(server.proc) - cpu0
    if target == "ours-redis":
        res["redis_cpu_s"] = _redis_cpu_s(run.redis) - redis0
    res["calls"] = await _upstream_calls(run.mock_url) - calls0
    return res


async def _rounds(run: Run) -> tuple[dict, dict]:
    runs: dict[tuple[str, int, str], list[dict]] = {}
    ttfc: dict[str, list[float]] = {t: [] for t in ("direct", *run.peers)}
    cells = [(mode, body, conc) for mode, body in MODES.items() for conc in run.args.concurrencies]
    for rnd in range(run.args.rounds):
        # The order rotates from cell to cell and, for the same cell, from round to round.
        for i, (mode, body, conc) in enumerate(cells):
            for target in ("direct", *run.turns(i + rnd)):
                res = await _measure(run, target, body, conc)
                runs.setdefault((mode, conc, target), []).append(res)
                extra = f" CPU {res['cpu_s'] / max(1, res['calls']) * 1000:.3f} ms/req" if "cpu_s" in res else ""
                print(
                    f"round {rnd + 1} {mode:10} c={conc:<2} {target:10} p50 {res['p50_ms']:8.2f} ms "
                    f"p99 {res['p99_ms']:8.2f} ms {res['rps']:7.0f} req/s errors {res['errors']}{extra}",
                    file=sys.stderr,
                )
        for target in ("direct", *run.turns(rnd)):
            ttfc[target].append(await _ttfc(*run.endpoint(target), run.args.ttft_samples))
    return runs, ttfc


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _cpu_ms(results: list[dict], key: str = "cpu_s") -> float:
    return sum(r[key] for r in results) / sum(r["calls"] for r in results) * 1000


def _added(runs: dict, mode: str, conc: int, target: str, key: str) -> float:
    """Median over rounds of (peer − direct) measured in the same round."""
    pairs = zip(runs[(mode, conc, target)], runs[(mode, conc, "direct")], strict=True)
    return _med([p[key] - d[key] for p, d in pairs])


def _rps(results: list[dict]) -> float:
    return sum(r["n"] for r in results) / sum(r["duration_s"] for r in results)


def _times(value: float, ours: float) -> str:
    return f" ({value / ours:.1f}×)" if ours > 0 and value > 0 else ""


def summary_table(runs: dict, ttfc: dict, run: Run, rss: dict) -> str:
    """One row per gateway: the figures the README quotes."""
    concs = run.args.concurrencies
    lines = [
        "| gateway | CPU ms/request, non-stream · stream (× ours) | added p50 ms, c=1 "
        "| time to first token added ms, c=1 | req/s, c=16 | p50 / p99 ms, c=16 (p99/p50) "
        "| RSS MiB, idle → after load | startup s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {mode: _cpu_ms([r for c in concs for r in runs[(mode, c, "ours")]]) for mode in MODES}
    direct16 = runs[("non-stream", 16, "direct")]
    d50, d99 = _med([r["p50_ms"] for r in direct16]), _med([r["p99_ms"] for r in direct16])
    lines.append(
        f"| direct to the mock | — | (p50 {_med([r['p50_ms'] for r in runs[('non-stream', 1, 'direct')]]):.2f}) "
        f"| (TTFT {_med(ttfc['direct']):.2f}) | {_rps(direct16):,.0f} | {d50:.2f} / {d99:.2f} ({d99 / d50:.1f}×) "
        "| — | — |"
    )
    for t in run.peers:
        cpu = {mode: _cpu_ms([r for c in concs for r in runs[(mode, c, t)]]) for mode in MODES}
        cpu_cell = " · ".join(f"{cpu[m]:.3f}{'' if t == 'ours' else _times(cpu[m], base[m])}" for m in MODES)
        if t == "ours-redis":
            store = _cpu_ms([r for m in MODES for c in concs for r in runs[(m, c, t)]], "redis_cpu_s")
            cpu_cell += f"; + Redis server ≤ {store:.3f}"
        ttft = _med([p - d for p, d in zip(ttfc[t], ttfc["direct"], strict=True)])
        c16 = runs[("non-stream", 16, t)]
        p50, p99 = _med([r["p50_ms"] for r in c16]), _med([r["p99_ms"] for r in c16])
        starts = ", ".join(f"{s:.1f}" for s in run.servers[t].startup_s)
        lines.append(
            f"| {LABELS[t]} | {cpu_cell} | {_added(runs, 'non-stream', 1, t, 'p50_ms'):+.2f} | {ttft:+.2f} "
            f"| {_rps(c16):,.0f} | {p50:.2f} / {p99:.2f} ({p99 / p50:.1f}×) "
            f"| {rss[('idle', t)]:.0f} → {rss[('load', t)]:.0f} | {starts} |"
        )
    return "\n".join(lines)


def detail_tables(runs: dict, run: Run) -> str:
    peers, concs = run.peers, run.args.concurrencies
    lines = [
        "| mode | c | direct p50 / p99 ms | "
        + " | ".join(f"{LABELS[t]}: p50 / p99 ms (added p50)" for t in peers)
        + " |",
        "|---|---|---|" + "---|" * len(peers),
    ]
    for mode in MODES:
        for conc in concs:
            cells = []
            for t in ("direct", *peers):
                rs = runs[(mode, conc, t)]
                cell = f"{_med([r['p50_ms'] for r in rs]):.2f} / {_med([r['p99_ms'] for r in rs]):.2f}"
                if t != "direct":
                    cell += f" ({_added(runs, mode, conc, t, 'p50_ms'):+.2f})"
                cells.append(cell)
            lines.append(f"| {mode} | {conc} | {' | '.join(cells)} |")
    lines += [
        "",
        "| mode | c | direct req/s | "
        + " | ".join(f"{LABELS[t]}: CPU ms/req · req/s · errors · {run.args.loadgen} CPU ms/req" for t in peers)
        + " |",
        "|---|---|---|" + "---|" * len(peers),
    ]
    for mode in MODES:
        for conc in concs:
            cells = [f"{_rps(runs[(mode, conc, 'direct')]):,.0f}"]
            for t in peers:
                rs = runs[(mode, conc, t)]
                lg = sum(r["loadgen_cpu_s"] for r in rs) / max(1, sum(r["n"] for r in rs)) * 1000
                errors = sum(r["errors"] for r in rs)
                cells.append(f"{_cpu_ms(rs):.3f} · {_rps(rs):,.0f} · {errors} · {lg:.3f}")
            lines.append(f"| {mode} | {conc} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "proxy"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + (" + uncommitted changes in proxy/" if dirty.stdout.strip() else "")


def _servers(tmp: Path, mock_url: str, wanted: tuple[str, ...]) -> dict[str, Server]:
    ours_cli = str(Path(sys.executable).with_name("llm-numbers-proxy"))

    def ours(name: str, env: dict[str, str]) -> Server:
        port = _free_port()
        args = [ours_cli, "serve", "--config", str(tmp / "policy.yaml"), "--port", str(port), "--log-level", "warning"]
        return Server(name, args, {**os.environ, **env}, port, tmp / f"{name}.log", _AUTH)

    servers = {}
    for name in wanted:
        if name == "ours":
            servers[name] = ours(name, {})
        elif name == "ours-redis":
            servers[name] = ours(name, {"LLM_PROXY_REDIS_URL": REDIS_URL})
        elif name == "ours-granian":
            port = _free_port()
            args = [sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--factory"]
            args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "proxy.app:create_app"]
            env = {**os.environ, "LLM_PROXY_CONFIG": str(tmp / "policy.yaml")}
            servers[name] = Server(name, args, env, port, tmp / f"{name}.log", _AUTH)
        elif name == "portkey":
            port = _free_port()
            entry = portkey_peer.ensure_installed()
            cmd, env = portkey_peer.command(entry, port), portkey_peer.env(dict(os.environ))
            headers = portkey_peer.headers(mock_url, UPSTREAM_KEY)
            servers[name] = Server(name, cmd, env, port, tmp / "portkey.log", headers)
        elif name == "litellm":
            port = _free_port()
            cmd = litellm_peer.command(litellm_peer.ensure_venv(), str(tmp / "litellm.yaml"), port)
            servers[name] = Server(name, cmd, litellm_peer.env(), port, tmp / "litellm.log", _AUTH)
    return servers


async def main_async(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    mock_port = _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    prefix = f"llmpeers{uuid.uuid4().hex[:6]}"
    # The bench policy (one team, one key, model `m`); the Redis row keeps its state under a prefix of its own.
    (tmp / "policy.yaml").write_text(_policy(mock_url) + f"store: {{key_prefix: {prefix}}}\n")
    (tmp / "litellm.yaml").write_text(litellm_peer.config(mock_url, KEY))
    servers = _servers(tmp, mock_url, args.peers)
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    run = Run(mock_url, servers, client, args)
    commit = _commit()
    mock = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        await _wait(mock_url + "/v1/models")
        # Startup rounds rotate too; the last round's processes stay up for the load rounds.
        for i in range(args.startup_rounds):
            for name in run.turns(i):
                await _start(servers[name])
                print(f"startup {name}: {servers[name].startup_s[-1]:.2f} s", file=sys.stderr)
                if i < args.startup_rounds - 1:
                    _stop(servers[name])
        await _check_same_answers(mock_url + "/v1/chat/completions", servers)
        rss = {("idle", t): _tree_rss_mib(servers[t].proc) for t in run.peers}
        await _warm_up(servers, args.warm_up)
        runs, ttfc = await _rounds(run)
        rss |= {("load", t): _tree_rss_mib(servers[t].proc) for t in run.peers}
    finally:
        for server in servers.values():
            _stop(server)
        mock.terminate()
        mock.wait(10)
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    summary, details = summary_table(runs, ttfc, run, rss), detail_tables(runs, run)
    print(summary + "\n\n" + details)
    if args.write:
        _write(summary, details, args, commit, elapsed)


def _write(summary: str, details: str, args, commit: str, elapsed: float) -> None:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"2-core shared VM ({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()})"
    command = f"python -m bench.peers {' '.join(sys.argv[1:])}"
    header = (
        f"\n## Gateways side by side — {when} — {machine} — commit {commit} (`{command}`, {elapsed:.0f} s)\n\n"
        "One process each, in front of the same zero-latency `llm-numbers-proxy mock-upstream` on loopback, all "
        "relaying its answers unchanged (checked first), then warmed up with "
        f"{args.warm_up} requests per mode: `llm-numbers-proxy serve` (bench policy: one team, one key, model "
        "`m`) with its memory store and, as a second row, with `LLM_PROXY_REDIS_URL` (its own key prefix); "
        f"Portkey's gateway {portkey_peer.GATEWAY_VERSION} (npm, `node start-server.js --headless`, upstream "
        "from `x-portkey-provider: openai` and `x-portkey-custom-host`); LiteLLM "
        f"{litellm_peer.LITELLM_VERSION} (`litellm --num_workers 1`, master key only, no database, local cost "
        f"map). Load from {args.loadgen}, closed loop, {args.seconds:g} s per run, {args.rounds} rounds; in "
        "each (mode, concurrency) a direct run to the mock, then the gateways in rotating order. Latencies: "
        "median over rounds; added = gateway − direct in the same round. CPU per request: the gateway's "
        "process tree (psutil) divided by the calls the mock received, over all concurrencies; for the Redis "
        "row the Redis server's own CPU (INFO, a server shared with other work: an upper bound) is given "
        "apart. RSS: the process tree after startup and after the load rounds. Load generator, mock and "
        "gateways share the machine's 2 cores with other work: compare within the run.\n\n"
    )
    with open(args.results, "a") as f:
        f.write(header + summary + "\n\n" + details + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = (
        f"{README_START}\n"
        f"Measured {when} on a 2-core shared VM, commit {commit}, `{command}` "
        "(details and method in [bench/RESULTS.md](bench/RESULTS.md)):\n\n"
        f"{summary}\n{README_END}"
    )
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if pattern.search(text):
        readme.write_text(pattern.sub(lambda _: block, text))
    else:
        print(f"README.md has no {README_START} block: summary not copied there", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"shorter defaults ({QUICK}); explicit options win")
    ap.add_argument("--seconds", type=float, help=f"length of each load run (default {FULL['seconds']:g})")
    ap.add_argument("--rounds", type=int, help="rotating rounds of every (mode, concurrency)")
    ap.add_argument("--startup-rounds", type=int)
    ap.add_argument("--warm-up", type=int, help="requests per peer and mode before measuring")
    ap.add_argument("--ttft-samples", type=int, help="sequential streams per TTFT sample")
    ap.add_argument("--concurrencies", help="comma-separated; must include 1 and 16 (default 1,16,64)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument(
        "--loadgen",
        choices=["wrk", "python"],
        default="wrk" if wrk_path() else "python",
        help="wrk (C, default when installed) or bench.overhead's aiohttp generator",
    )
    ap.add_argument("--write", action="store_true", help="append the tables to --results and update README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrencies = tuple(int(c) for c in args.concurrencies.split(","))
    wanted = {p.strip() for p in args.peers.split(",") if p.strip()}
    if unknown := wanted - set(PEERS + OPTIONAL):
        ap.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS + OPTIONAL)}")
    args.peers = tuple(p for p in PEERS + OPTIONAL if p in wanted)
    if "ours" not in args.peers:
        ap.error("--peers must include ours (the other rows are given as multiples of it)")
    if not {1, 16} <= set(args.concurrencies):
        ap.error("--concurrencies must include 1 and 16 (the summary's columns)")
    if args.rounds < 1 or args.startup_rounds < 1 or args.seconds <= 0:
        ap.error("--rounds and --startup-rounds must be ≥ 1 and --seconds > 0")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
