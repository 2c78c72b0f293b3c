"""Side by side with the LiteLLM proxy: this proxy and LiteLLM's, one process each, in front of the same
zero-latency mock upstream on loopback, measured in alternating turns so drift on the shared machine
hits both alike.

Per mode (non-stream, stream) and concurrency 1/16/64: p50/p99 added to a direct call to the mock,
throughput, and the proxy process's CPU per request (process tree, psutil, read once the CPU has
settled, divided by the calls the mock received: the exact number of requests the proxy handled).
Also: time to first chunk added to a direct stream, RSS idle and after load, and startup time
(spawn → first 200 on a real chat completion).

The first run installs litellm[proxy] into bench/.peers-venv (git-ignored). Load comes from wrk when
installed (apt-get install -y wrk): at concurrency 16/64 bench.overhead's aiohttp generator spends about as
much CPU per request as this proxy does, on the same 2 cores (`--loadgen python` shows it).

Usage: .venv/bin/python -m bench.peers [--seconds 5] [--rounds 2] [--startup-rounds 3] [--loadgen wrk] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil

from bench import litellm_peer
from bench.overhead import BODY, KEY, ROOT, STREAM_BODY, _free_port, _load, _policy, _ttfc, _wait
from bench.wrk_load import run_wrk, wrk_path

CONCURRENCIES = (1, 16, 64)
MODES = {"non-stream": BODY, "stream": STREAM_BODY}
PEERS = ("ours", "litellm")
_JSON = {"Content-Type": "application/json"}
_AUTH = {**_JSON, "Authorization": f"Bearer {KEY}"}


@dataclass
class Server:
    name: str
    args: list[str]
    env: dict[str, str]
    port: int
    log: Path
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


async def _upstream_calls(mock_url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(mock_url + "/mock/stats") as r:
        calls = (await r.json())["calls"]
    return sum(v for k, v in calls.items() if k.endswith("chat/completions"))


def _log_tail(server: Server) -> str:
    try:
        return server.log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


async def _start(server: Server, timeout_s: float = 120) -> None:
    """Spawn, then POST a real request every 20 ms until the first 200: the startup a client sees."""
    t0 = time.perf_counter()
    with open(server.log, "ab") as log:
        server.proc = subprocess.Popen(server.args, cwd=ROOT, env=server.env, stdout=log, stderr=log)
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < timeout_s:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{_log_tail(server)}")
            try:
                async with s.post(server.url, data=BODY, headers=_AUTH) as r:
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
    """Both peers must relay the mock's answer unchanged, streamed and not, or the comparison is void."""
    for stream in (False, True):
        want = await _reply_text(direct_url, _JSON, stream)
        for server in servers.values():
            got = await _reply_text(server.url, _AUTH, stream)
            if got != want:
                raise RuntimeError(f"{server.name} (stream={stream}) answered {got!r}, the mock said {want!r}")


async def _warm_up(servers: dict[str, Server], n: int) -> None:
    """Both peers import lazily on first use; steady state is what the load rounds measure."""
    async with aiohttp.ClientSession() as s:
        for server in servers.values():
            for body in MODES.values():
                for _ in range(n):
                    async with s.post(server.url, data=body, headers=_AUTH) as r:
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


async def _measure(mock_url: str, target: str, servers: dict[str, Server], body: bytes, concurrency: int, args) -> dict:
    server = servers.get(target)
    url, headers = _endpoint(target, servers, mock_url)
    calls0 = await _upstream_calls(mock_url)
    cpu0 = _tree_cpu(server.proc) if server else 0.0
    res = await _run_load(url, headers, body, concurrency, args.seconds, args.loadgen)
    if server:
        res["cpu_s"] = await _settled_cpu(server.proc) - cpu0
    res["calls"] = await _upstream_calls(mock_url) - calls0
    return res


def _endpoint(target: str, servers: dict[str, Server], mock_url: str) -> tuple[str, dict]:
    if target in servers:
        return servers[target].url, _AUTH
    return mock_url + "/v1/chat/completions", _JSON


def _turns(i: int) -> tuple[str, ...]:
    """A,B then B,A: each peer goes first in half of the turns."""
    return PEERS if i % 2 == 0 else PEERS[::-1]


async def _rounds(mock_url: str, servers: dict[str, Server], args) -> tuple[dict, dict]:
    runs: dict[tuple[str, int, str], list[dict]] = {}
    ttfc: dict[str, list[float]] = {t: [] for t in ("direct", *PEERS)}
    cells = [(mode, body, conc) for mode, body in MODES.items() for conc in CONCURRENCIES]
    for rnd in range(args.rounds):
        # The order flips from cell to cell and, for the same cell, from round to round.
        for i, (mode, body, conc) in enumerate(cells):
            for target in ("direct", *_turns(i + rnd)):
                res = await _measure(mock_url, target, servers, body, conc, args)
                runs.setdefault((mode, conc, target), []).append(res)
                extra = f" CPU {res['cpu_s'] / max(1, res['calls']) * 1000:.3f} ms/req" if "cpu_s" in res else ""
                print(
                    f"round {rnd + 1} {mode:10} c={conc:<2} {target:8} p50 {res['p50_ms']:8.2f} ms "
                    f"p99 {res['p99_ms']:8.2f} ms {res['rps']:7.0f} req/s errors {res['errors']}{extra}",
                    file=sys.stderr,
                )
        for target in ("direct", *_turns(rnd)):
            ttfc[target].append(await _ttfc(*_endpoint(target, servers, mock_url), args.ttft_samples))
    return runs, ttfc


def _ratio(litellm: float, ours: float) -> str:
    return f"{litellm / ours:.1f}x" if ours > 0 and litellm > 0 else "—"


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _cpu_ms(results: list[dict]) -> float:
    return sum(r["cpu_s"] for r in results) / sum(r["calls"] for r in results) * 1000


def _added(runs: dict, mode: str, conc: int, target: str, key: str) -> float:
    """Median over rounds of (peer − direct) measured in the same round."""
    pairs = zip(runs[(mode, conc, target)], runs[(mode, conc, "direct")], strict=True)
    return _med([p[key] - d[key] for p, d in pairs])


def _tables(runs: dict, ttfc: dict, servers: dict[str, Server], rss: dict, loadgen: str) -> str:
    lines = [
        "| mode | concurrency | direct p50 / p99 ms | ours p50 / p99 ms | LiteLLM p50 / p99 ms "
        "| added p50 ms: ours · LiteLLM · ratio | added p99 ms: ours · LiteLLM · ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for conc in CONCURRENCIES:
            cell = [
                f"{_med([r['p50_ms'] for r in runs[(mode, conc, t)]]):.2f} / "
                f"{_med([r['p99_ms'] for r in runs[(mode, conc, t)]]):.2f}"
                for t in ("direct", *PEERS)
            ]
            added = []
            for key in ("p50_ms", "p99_ms"):
                o, ll = (_added(runs, mode, conc, t, key) for t in PEERS)
                added.append(f"{o:+.2f} · {ll:+.2f} · {_ratio(ll, o)}")
            lines.append(f"| {mode} | {conc} | {' | '.join(cell)} | {' | '.join(added)} |")
    lines += [
        "",
        "| mode | concurrency | proxy CPU ms/req: ours · LiteLLM · ratio "
        "| req/s: direct · ours · LiteLLM · ours/LiteLLM "
        f"| errors: ours · LiteLLM | {loadgen} CPU ms/req: ours · LiteLLM |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for conc in CONCURRENCIES:
            res = {t: runs[(mode, conc, t)] for t in ("direct", *PEERS)}
            rps = {t: sum(r["n"] for r in rs) / sum(r["duration_s"] for r in rs) for t, rs in res.items()}
            cpu = {t: _cpu_ms(res[t]) for t in PEERS}
            lg = {
                t: sum(r["loadgen_cpu_s"] for r in res[t]) / max(1, sum(r["n"] for r in res[t])) * 1000 for t in PEERS
            }
            errors = {t: sum(r["errors"] for r in res[t]) for t in PEERS}
            lines.append(
                f"| {mode} | {conc} "
                f"| {cpu['ours']:.3f} · {cpu['litellm']:.3f} · {_ratio(cpu['litellm'], cpu['ours'])} "
                f"| {rps['direct']:.0f} · {rps['ours']:.0f} · {rps['litellm']:.0f} "
                f"· {_ratio(rps['ours'], rps['litellm'])} "
                f"| {errors['ours']} · {errors['litellm']} | {lg['ours']:.3f} · {lg['litellm']:.3f} |"
            )
    summary = {}
    for mode in MODES:
        summary[f"proxy CPU ms/request, {mode} (all concurrencies)"] = {
            t: _cpu_ms([r for c in CONCURRENCIES for r in runs[(mode, c, t)]]) for t in PEERS
        }
    summary["time to first chunk added, ms (p50, concurrency 1)"] = {
        t: _med([p - d for p, d in zip(ttfc[t], ttfc["direct"], strict=True)]) for t in PEERS
    }
    summary["RSS idle, MiB"] = {t: rss[("idle", t)] for t in PEERS}
    summary["RSS after load, MiB"] = {t: rss[("load", t)] for t in PEERS}
    summary["startup s (spawn → first 200), median"] = {t: _med(servers[t].startup_s) for t in PEERS}
    lines += ["", "| | ours | LiteLLM | LiteLLM / ours |", "|---|---|---|---|"]
    for name, v in summary.items():
        lines.append(f"| {name} | {v['ours']:.3f} | {v['litellm']:.3f} | {_ratio(v['litellm'], v['ours'])} |")
    starts = {t: ", ".join(f"{s:.2f}" for s in servers[t].startup_s) for t in PEERS}
    lines += ["", f"Startup samples (s): ours {starts['ours']}; LiteLLM {starts['litellm']}."]
    return "\n".join(lines)


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "proxy"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + (" + uncommitted changes in proxy/" if dirty.stdout.strip() else "")


async def main_async(args) -> None:
    litellm_exe = litellm_peer.ensure_venv()
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    mock_port = _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    (tmp / "policy.yaml").write_text(_policy(mock_url))
    (tmp / "litellm.yaml").write_text(litellm_peer.config(mock_url, KEY))
    ours_cli = str(Path(sys.executable).with_name("llm-numbers-proxy"))
    ours_port, litellm_port = _free_port(), _free_port()
    servers = {
        "ours": Server(
            "ours",
            [
                ours_cli,
                "serve",
                "--config",
                str(tmp / "policy.yaml"),
                "--port",
                str(ours_port),
                "--log-level",
                "warning",
            ],
            dict(os.environ),
            ours_port,
            tmp / "ours.log",
        ),
        "litellm": Server(
            "litellm",
            litellm_peer.command(litellm_exe, str(tmp / "litellm.yaml"), litellm_port),
            litellm_peer.env(),
            litellm_port,
            tmp / "litellm.log",
        ),
    }
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
        # Startup rounds alternate too; the last round's processes stay up for the load rounds.
        for i in range(args.startup_rounds):
            for name in _turns(i):
                await _start(servers[name])
                print(f"startup {name}: {servers[name].startup_s[-1]:.2f} s", file=sys.stderr)
                if i < args.startup_rounds - 1:
                    _stop(servers[name])
        await _check_same_answers(mock_url + "/v1/chat/completions", servers)
        rss = {("idle", t): _tree_rss_mib(servers[t].proc) for t in PEERS}
        await _warm_up(servers, args.warm_up)
        runs, ttfc = await _rounds(mock_url, servers, args)
        rss |= {("load", t): _tree_rss_mib(servers[t].proc) for t in PEERS}
    finally:
        for server in servers.values():
            _stop(server)
        mock.terminate()
        mock.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    table = _tables(runs, ttfc, servers, rss, args.loadgen)
    print(table)
    if args.write:
        _write(table, args, commit, elapsed, runs)


def _write(table: str, args, commit: str, elapsed: float, runs: dict) -> None:
    ours = _cpu_ms([r for c in CONCURRENCIES for r in runs[("non-stream", c, "ours")]])
    ll = _cpu_ms([r for c in CONCURRENCIES for r in runs[("non-stream", c, "litellm")]])
    ll_p50_c1 = _added(runs, "non-stream", 1, "litellm", "p50_ms")
    ll_p99_c64 = _med([r["p99_ms"] for r in runs[("non-stream", 64, "litellm")]]) / 1000
    header = (
        f"\n## Side by side with the LiteLLM proxy — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()} — commit {commit} "
        f"(`python -m bench.peers {' '.join(sys.argv[1:])}`, {elapsed:.0f} s)\n\n"
        f"One process each: `llm-numbers-proxy serve` (bench policy: one team, one key, model `m`) and "
        f"LiteLLM {litellm_peer.LITELLM_VERSION} (`litellm --num_workers 1`, master key only, no database, local "
        "cost map), both in front of the same zero-latency `llm-numbers-proxy mock-upstream` on loopback and "
        "both relaying its answers unchanged (checked first), then warmed up with "
        f"{args.warm_up} requests per mode. Load from {args.loadgen}, closed loop, "
        f"{args.seconds:g} s per run, {args.rounds} rounds; in each (mode, concurrency) a direct run to the mock, "
        "then the two proxies in alternating order (A,B then B,A). Latencies: median over rounds; added = "
        "proxy − direct in the same round. CPU per request: the proxy's process tree (psutil) divided by the "
        "calls the mock received. Ratio = LiteLLM / ours except req/s (ours / LiteLLM). Load generator, mock "
        "and proxy share the machine's 2 cores with other work: compare within a row.\n\n"
    )
    reference = (
        "\n\nAgainst the reference figures quoted in issue 8 for this kind of machine (LiteLLM 5.7–7.5 ms CPU "
        "per request, +8–11 ms p50 at concurrency 1, p99 1.2–2.3 s at 64; Portkey's Node gateway 0.55–0.8 ms "
        f"CPU per request): this run measured LiteLLM at {ll:.2f} ms CPU per request, {ll_p50_c1:+.2f} ms p50 "
        f"at concurrency 1 and p99 {ll_p99_c64:.2f} s at 64, and this proxy at {ours:.3f} ms CPU per request.\n"
    )
    with open(args.results, "a") as f:
        f.write(header + table + reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of every (mode, concurrency)")
    ap.add_argument("--startup-rounds", type=int, default=3)
    ap.add_argument("--warm-up", type=int, default=30, help="requests per peer and mode before measuring")
    ap.add_argument("--ttft-samples", type=int, default=100, help="sequential streams per TTFT sample")
    ap.add_argument(
        "--loadgen",
        choices=["wrk", "python"],
        default="wrk" if wrk_path() else "python",
        help="wrk (C, default when installed) or bench.overhead's aiohttp generator",
    )
    ap.add_argument("--write", action="store_true", help="append the tables to --results")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    if args.rounds < 1 or args.startup_rounds < 1 or args.seconds <= 0:
        ap.error("--rounds and --startup-rounds must be ≥ 1 and --seconds > 0")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
