"""The latency tail at concurrency: p50, p99 and p99/p50 at c=16 and c=64, with every step of
bench/hot_path.py's policy on, and what the garbage collector did meanwhile (each server runs under
bench/gc_probe.py: every collection's generation and pause, counted inside the load windows).

With --before DIR the same proxy from another checkout (the commit before) runs in the same rounds.
Load from wrk (one thread); the zero-latency mock upstream shares the machine. Rounds alternate the
servers; each cell reports the median round (a shared machine's noise lands on single rounds).

Usage: .venv/bin/python -m bench.tail [--seconds 8] [--rounds 3] [--before DIR] [--redis] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis

from bench.hot_path import BODY, REDIS_URL, Target, _lua, full_policy, wrk
from bench.overhead import ROOT, _free_port, _spawn, _wait
from bench.results import append_section, short_commit

PROBE = ROOT / "bench" / "gc_probe.py"


def _serve(config: str, probe_out: Path) -> list[str]:
    return [sys.executable, str(PROBE), str(probe_out), "--", "proxy.cli", "serve", "--config", config,
            "--log-level", "warning"]  # fmt: skip


def _gc_in(pauses: list, windows: list[tuple[float, float]]) -> dict:
    inside = [(g, ms) for t, g, ms in pauses if any(a <= t <= b for a, b in windows)]
    seconds = sum(b - a for a, b in windows)
    by_gen = {g: [ms for gg, ms in inside if gg == g] for g in (0, 1, 2)}
    return {
        "per_s": {g: len(v) / seconds for g, v in by_gen.items()},
        "max_ms": {g: max(v, default=0.0) for g, v in by_gen.items()},
        "ms_per_s": sum(ms for _, ms in inside) / seconds,
        "gen_ms_per_s": {g: sum(v) / seconds for g, v in by_gen.items()},
    }


def _stalls_in(lags: list, stalls: list, windows: list[tuple[float, float]]) -> dict:
    def inside(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    seconds = sum(b - a for a, b in windows)
    late = sorted(ms for t, ms in lags if inside(t))
    where: Counter[str] = Counter()
    for t, _, stack in stalls:
        if inside(t) and stack:
            where[" ← ".join(line.split(" | ")[0] for line in reversed(stack[-3:]))] += 1
    return {
        "lag_p99_ms": late[int(len(late) * 0.99)] if late else 0.0,
        "lag_max_ms": late[-1] if late else 0.0,
        "per_s": sum(1 for t, *_ in stalls if inside(t)) / seconds,
        "where": where.most_common(5),
    }


async def run(seconds: float, rounds: int, before: Path | None, with_redis: bool, threshold: str = "") -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="tail-"))
    mock_port = _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = _spawn([sys.executable, "-m", "proxy.cli", "mock-upstream", "--port", str(mock_port)])
    prefix = f"llmpbench{uuid.uuid4().hex[:6]}"
    config = tmp / "policy.yaml"
    config.write_text(full_policy(mock_url, prefix, str(tmp / "requests.jsonl")))
    scripts = {auth: tmp / f"plain-{auth}.lua" for auth in (False, True)}
    for auth, path in scripts.items():
        path.write_text(_lua(BODY, auth))
    checkouts = [("head", ROOT)] + ([("before", before.resolve())] if before is not None else [])
    stores = [("memory", {})] + ([("redis", {"LLM_PROXY_REDIS_URL": REDIS_URL})] if with_redis else [])
    # The bare pass-through floor (uvicorn + one aiohttp call, no policy) under the same probe: the tail a
    # saturated single event loop on this machine has anyway.
    bare_args = ["uvicorn", "bench.bare_passthrough:app", "--loop", "uvloop", "--http", "httptools",
                 "--no-access-log", "--log-level", "warning"]  # fmt: skip
    bare_out = tmp / "gc-bare.json"
    bare_env = {"BARE_UPSTREAM": mock_url + "/v1/chat/completions", "PYTHONPATH": str(ROOT)}
    targets: list[tuple[Target, Path]] = [
        (Target("bare floor", [sys.executable, str(PROBE), str(bare_out), "--", *bare_args], bare_env, False), bare_out)
    ]
    for label, checkout in checkouts:
        for store, env in stores:
            out = tmp / f"gc-{label}-{store}.json"
            t = Target(f"{store}, {label}", _serve(str(config), out), {**env, "PYTHONPATH": str(checkout)}, True,
                       checkout)  # fmt: skip
            targets.append((t, out))
    if threshold:
        for store, env in stores:
            out = tmp / f"gc-head-{store}-threshold.json"
            env = {**env, "PYTHONPATH": str(ROOT), "BENCH_GC_THRESHOLD": threshold}
            name = f"{store}, head, gc threshold {threshold}"
            targets.append((Target(name, _serve(str(config), out), env, True), out))
    cells: dict[str, dict[int, list[dict]]] = {t.name: {16: [], 64: []} for t, _ in targets}
    windows: dict[str, list[tuple[float, float]]] = {t.name: [] for t, _ in targets}
    try:
        await _wait(mock_url + "/v1/models")
        for t, _ in targets:
            await t.start()
        for _ in range(rounds):
            for t, _ in targets:
                script = scripts[t.auth]
                wrk(t.url, str(script), 16, 1, t.proc.pid)  # warm up
                for c in (16, 64):
                    t0 = time.time()
                    cells[t.name][c].append(wrk(t.url, str(script), c, seconds, t.proc.pid))
                    windows[t.name].append((t0, time.time()))
        for t, _ in targets:
            t.stop()
    finally:
        for t, _ in targets:
            if t.proc is not None and t.proc.poll() is None:
                t.stop()
        mock.terminate()
        mock.wait(10)
        if with_redis:
            client = redis.Redis.from_url(REDIS_URL)
            for k in client.scan_iter(f"{prefix}:*", count=1000):
                client.delete(k)
            client.close()
    rows = []
    for t, out in targets:
        probe = json.loads(out.read_text()) if out.exists() else {}
        row = {"name": t.name, "gc": _gc_in(probe.get("pauses", []), windows[t.name])}
        row["stalls"] = _stalls_in(probe.get("lags", []), probe.get("stalls", []), windows[t.name])
        for c in (16, 64):
            runs = cells[t.name][c]
            ratios = [r["p99_ms"] / r["p50_ms"] for r in runs]
            row[c] = {
                "p50": statistics.median(r["p50_ms"] for r in runs),
                "p99": statistics.median(r["p99_ms"] for r in runs),
                "ratio": statistics.median(ratios),
                "ratios": ratios,
                "rps": statistics.median(r["rps"] for r in runs),
            }
        rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| server | c=16 p50 / p99 ms | c=16 p99/p50 (each round) | c=64 p50 / p99 ms | c=64 p99/p50 (each round) "
        "| rps c=16 / c=64 | gc gen0 / gen1 / gen2 per s | longest gen2 pause ms | gc ms per s (gen0 / 1 / 2) "
        "| loop stalls > 15 ms per s | longest loop lag ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gc"]
        a, b = r[16], r[64]
        by_gen = " / ".join(f"{g['gen_ms_per_s'][i]:.1f}" for i in (0, 1, 2))
        ra, rb = (", ".join(f"{x:.1f}" for x in cell["ratios"]) for cell in (a, b))
        lines.append(
            f"| {r['name']} | {a['p50']:.2f} / {a['p99']:.2f} | {a['ratio']:.1f} ({ra}) "
            f"| {b['p50']:.2f} / {b['p99']:.2f} | {b['ratio']:.1f} ({rb}) "
            f"| {a['rps']:.0f} / {b['rps']:.0f} "
            f"| {g['per_s'][0]:.1f} / {g['per_s'][1]:.2f} / {g['per_s'][2]:.2f} | {g['max_ms'][2]:.1f} "
            f"| {g['ms_per_s']:.1f} ({by_gen}) | {r['stalls']['per_s']:.2f} | {r['stalls']['lag_max_ms']:.0f} |"
        )
    for r in rows:
        if r["stalls"]["where"]:
            lines.append(f"\nWhere the loop was during stalls ({r['name']}, innermost first):")
            lines += [f"- {n}× {where}" for where, n in r["stalls"]["where"]]
    lines.append(f"\nLoad average (1 min) at the end, other engineers' jobs included: {os.getloadavg()[0]:.1f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=Path, help="also run the proxy from this checkout (the commit before)")
    ap.add_argument("--redis", action="store_true", help="also run with the Redis store")
    ap.add_argument("--gc-threshold", default="", help="also run head with these gc thresholds (e.g. 7000,10,10)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    table = render(asyncio.run(run(args.seconds, args.rounds, args.before, args.redis, args.gc_threshold)))
    print(table)
    if args.write:
        header = (
            f"\n## Latency tail at concurrency — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — 2-core shared "
            f"VM, Python {platform.python_version()}, commit {short_commit()} (`python -m bench.tail "
            f"--seconds {args.seconds:g} --rounds {args.rounds}{' --redis' if args.redis else ''}"
            f"{' --before DIR' if args.before else ''}`)\n\n"
        )
        append_section(header + table)


if __name__ == "__main__":
    main()
