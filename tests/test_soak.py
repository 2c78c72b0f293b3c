"""Soak: mixed traffic for ten minutes (LLM_PROXY_SOAK_SECONDS for local runs) through three real proxies
at once, each with a semantic cache: on Redis (its own key prefix) with the local embedder, on Redis with
an embedding model, and on the memory store with an embedding model. The two without torch are small
processes, so their RSS shows a leak of a few MB; the local embedder's tokenizer and torch hold native
memory that grows with new text up to a plateau (bench/RESULTS.md, "Soak").

After a warm-up (caches, tiktoken tables, the index and the connection pools fill) memory, file
descriptors and metric series must stay flat, nothing unexpected may fail, the deliberately caused
errors must keep the same rate, and at the end no budget stays reserved and spend equals what the cost
headers said. The load is bounded and paced (tests/soak_traffic.py): 8 concurrent lanes per proxy."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest

from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    MockUpstream,
    Server,
    free_port,
    launch_proxy,
    private_redis_keys,
    start_process,
    wait_for,
    wait_until_serving,
)
from tests.soak_traffic import EXPECTED_ERRORS, OUTCOMES, Tally, Traffic, policy_yaml

SOAK_S = float(os.environ.get("LLM_PROXY_SOAK_SECONDS", "600"))
ROWS = 10  # samples, one per tenth of the soak (a minute at full length)
WARMUP_ROWS = 2
MIXED_WORKERS = 6  # plus the rate-limit lane and the fault lane: 8 concurrent requests per proxy
MIXED_RPS = float(os.environ.get("LLM_PROXY_SOAK_RPS", "24"))  # per proxy
# name: (on Redis?, the cache's embedder)
PROXIES = {"local": (True, "local"), "redis": (True, "lookup-embed"), "memory": (False, "lookup-embed")}
FAULT_PERIOD_S = 0.5
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
# A cut-off stream (slow: 60 words, brittle: 32) costs less than 200 input + 200 output tokens at $1/$2.
PARTIAL_STREAM_MAX_USD = (200 * 1.0 + 200 * 2.0) / 1e6


@dataclass
class Row:
    t_s: float
    counts: Counter[tuple[str, str]]
    rss_mb: float
    fds: int
    conns: int
    series: frozenset[str]  # every metric series by name and labels, without its value
    cpu_s: float

    def outcome(self, outcome: str, lane: str | None = None) -> int:
        return sum(n for (ln, oc), n in self.counts.items() if oc == outcome and lane in (None, ln))

    def requests(self, lane: str | None = None) -> int:
        return sum(n for (ln, _), n in self.counts.items() if lane in (None, ln))


def _mock(tmp: Path, *args: str) -> MockUpstream:
    port = free_port()
    server = start_process(["mock-upstream", "--port", str(port), *args], port, "/v1/models", tmp)
    return MockUpstream(server.proc, server.port, server.log_path)


@pytest.fixture(scope="module")
def soak_mocks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MockUpstream, MockUpstream]]:
    """The soak's own mocks: a fast one with a little latency, and a slow streamer (20 ms a chunk) whose
    streams last long enough for clients to leave in the middle."""
    tmp = tmp_path_factory.mktemp("soak-mocks")
    fast = _mock(tmp, "--latency-ms", "3")
    slow = _mock(tmp, "--reply-tokens", "60")
    slow.configure(chunk_delay_ms=20)
    yield fast, slow
    fast.stop()
    slow.stop()


@pytest.fixture(scope="module")
def soak_prefix() -> Iterator[str]:
    with private_redis_keys(f"llmpsoak{uuid.uuid4().hex[:8]}") as prefix:  # every proxy's prefix starts with it
        yield prefix


def _wait_serving(server: Server) -> None:
    """Like conftest's start-up wait, with room for the local embedder to load on a busy machine."""
    try:
        wait_until_serving(server.url + "/healthz", server.proc, timeout=180)
        wait_for(lambda: _collections_ready(server), "the collections to load", timeout=120)
    except Exception:
        raise RuntimeError(f"the proxy did not start:\n{server.log()}") from None


def _collections_ready(server: Server) -> bool:
    status = httpx.get(server.url + "/readyz").json().get("collections", {})
    return bool(status) and all(c["ready"] for c in status.values())


async def _sample(proc: psutil.Process, session: aiohttp.ClientSession, url: str, t_s: float, counts) -> Row:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    cpu = proc.cpu_times()
    return Row(
        t_s=t_s,
        counts=counts,
        rss_mb=proc.memory_info().rss / 2**20,
        fds=proc.num_fds(),
        conns=len(proc.net_connections(kind="tcp")),
        series=frozenset(line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")),
        cpu_s=cpu.user + cpu.system,
    )


async def _soak(proxies: dict[str, Server], mocks: tuple[MockUpstream, MockUpstream]):
    """Run every lane against every proxy and sample each proxy ROWS times; return the rows, the tallies
    and one sample taken after the load stopped and the connections closed."""
    fast, _ = mocks
    interval = SOAK_S / ROWS
    procs = {name: psutil.Process(p.proc.pid) for name, p in proxies.items()}
    tallies = {name: Tally() for name in proxies}
    rows: dict[str, list[Row]] = {name: [] for name in proxies}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        traffic = {name: Traffic(p.url, fast.url, name, session, tallies[name]) for name, p in proxies.items()}
        lanes = []
        for t in traffic.values():
            lanes += [t.mixed(w, MIXED_WORKERS / MIXED_RPS) for w in range(MIXED_WORKERS)]
            lanes += [t.limited(), t.faults(FAULT_PERIOD_S)]
        running = asyncio.gather(*lanes)
        start = time.monotonic()
        base = {name: await _sample(procs[name], session, p.url, 0, Counter()) for name, p in proxies.items()}
        for i in range(1, ROWS + 1):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))  # the sampling clock
            for name, p in proxies.items():
                rows[name].append(await _sample(procs[name], session, p.url, i * interval, tallies[name].take()))
        for t in traffic.values():
            t.stop.set()
        await running
        for name in proxies:
            rows[name][-1].counts.update(tallies[name].take())  # the requests that were in flight
        for t in traffic.values():
            await t.close()
    after = {name: await _quiet_sample(procs[name]) for name in proxies}
    return base, rows, tallies, after


async def _quiet_sample(proc: psutil.Process) -> Row:
    return Row(0, Counter(), proc.memory_info().rss / 2**20, proc.num_fds(), 0, 0, 0)


def _table(name: str, base: Row, rows: list[Row]) -> str:
    head = f"{'t(s)':>6} {'reqs':>6} " + " ".join(f"{o[:10]:>10}" for o in OUTCOMES)
    head += f" {'RSS MB':>7} {'fds':>4} {'conns':>5} {'series':>6} {'cpu ms/req':>10}"
    lines = [f"proxy '{name}': RSS at start {base.rss_mb:.1f} MB, {base.fds} fds", head]
    prev = base
    for r in rows:
        reqs = r.requests()
        cpu = (r.cpu_s - prev.cpu_s) * 1000 / reqs if reqs else 0.0
        cells = " ".join(f"{r.outcome(o):>10}" for o in OUTCOMES)
        lines.append(
            f"{r.t_s:>6.0f} {reqs:>6} {cells} {r.rss_mb:>7.1f} {r.fds:>4} {r.conns:>5} {len(r.series):>6} {cpu:>10.2f}"
        )
        prev = r
    return "\n".join(lines)


def _admin_spend(server: Server) -> dict:
    r = httpx.get(server.url + "/admin/spend", headers=ADMIN, timeout=10)
    r.raise_for_status()
    return r.json()["teams"]


def _check_rates_stay_flat(name: str, rows: list[Row]) -> None:
    """Each deliberately caused error keeps its share of its lane: the second half of the soak (after
    warm-up) has no more of it than the first half."""
    measured = rows[WARMUP_ROWS:]
    half = len(measured) // 2
    first, second = Counter(), Counter()
    for r in measured[:half]:
        first.update(r.counts)
    for r in measured[half:]:
        second.update(r.counts)
    for lane in {ln for ln, _ in first} | {ln for ln, _ in second}:
        n1 = sum(n for (ln, _), n in first.items() if ln == lane)
        n2 = sum(n for (ln, _), n in second.items() if ln == lane)
        for outcome in EXPECTED_ERRORS:
            if outcome == "rate_limited" and SOAK_S / ROWS < 60:
                continue  # a paced lane over a one-minute sliding window: 30 s admitted, 30 s refused
            r1, r2 = first[(lane, outcome)] / max(n1, 1), second[(lane, outcome)] / max(n2, 1)
            slack = 0.02 + 3 / max(n2, 1)  # a short run's lanes see only part of their cycle
            assert r2 <= r1 * 1.25 + slack, f"{name}: {lane}/{outcome} rose from {r1:.3f} to {r2:.3f} of requests"
    made = Counter()
    for r in measured:
        made.update({outcome: r.outcome(outcome) for outcome in EXPECTED_ERRORS})
    assert all(made[o] > 0 for o in EXPECTED_ERRORS), f"{name}: the mix did not cause every kind of error: {made}"


def _check_books_balance(name: str, server: Server, tally: Tally) -> None:
    """No reservation outlives its request, and spend is exactly what the cost headers said (streams,
    which have no cost header: at least their usage, at most that plus the cut-off streams)."""

    def settled() -> dict | None:
        teams = _admin_spend(server)
        return teams if all(t["budget"]["reserved_usd"] == 0 for t in teams.values()) else None

    teams = wait_for(settled, f"{name}: every reservation to be settled", timeout=20)
    for team in ("alpha", "limited", "faults"):
        # A cache miss's lookup embedding is spend of the embedding model, and in the request's cost header.
        spent, told = teams[team]["spend_usd"], tally.cost_headers[team]
        assert spent == pytest.approx(told, rel=1e-6, abs=1e-6), f"{name}: {team} spent {spent}, headers said {told}"
    spent = teams["streams"]["spend_usd"]
    assert tally.stream_usage_cost - 1e-6 <= spent
    assert spent <= tally.stream_usage_cost + tally.partial_streams * PARTIAL_STREAM_MAX_USD


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 420)
async def test_soak_keeps_memory_fds_and_error_rates_flat(
    tmp_path: Path, soak_mocks: tuple[MockUpstream, MockUpstream], soak_prefix: str
) -> None:
    fast, slow = soak_mocks
    proxies: dict[str, Server] = {}
    try:
        for name, (on_redis, embedder) in PROXIES.items():
            policy = policy_yaml(name, fast.url, slow.url, f"{soak_prefix}{name}", embedder)
            # Three start together: the local embedder takes a while to load.
            proxies[name] = launch_proxy(tmp_path, policy, REDIS_URL if on_redis else None)
        started = time.monotonic()
        for server in proxies.values():
            _wait_serving(server)
        print(f"\nthree proxies serving after {time.monotonic() - started:.1f} s")
        base, rows, tallies, after = await _soak(proxies, soak_mocks)
        for name in proxies:
            print("\n" + _table(name, base[name], rows[name]) + f"\nafter the load: {after[name].fds} fds")
        for name, server in proxies.items():
            warm, last = rows[name][WARMUP_ROWS - 1], rows[name][-1]
            assert not tallies[name].unexpected, f"{name}: unexpected errors: {tallies[name].unexpected}"
            assert last.rss_mb <= 1.10 * warm.rss_mb, f"{name}: RSS grew from {warm.rss_mb:.1f} to {last.rss_mb:.1f} MB"
            warm_fds = max(r.fds for r in rows[name][:WARMUP_ROWS])
            assert last.fds <= warm_fds + 16, f"{name}: fds grew from {warm_fds} to {last.fds}"
            warm_conns = max(r.conns for r in rows[name][:WARMUP_ROWS])
            assert last.conns <= warm_conns + 16, f"{name}: TCP connections grew from {warm_conns} to {last.conns}"
            assert after[name].fds <= warm_fds + 16, f"{name}: {after[name].fds} fds stay open after the load"
            # The label combinations of the mix show up early; a per-request label would add one series per
            # request (thousands over the second half). A rare combination may still first appear late on a
            # loaded machine (a fault meeting a streamed request, say): a handful, named in the message.
            mid = rows[name][(WARMUP_ROWS + ROWS) // 2]
            new = sorted(last.series - mid.series)
            assert len(new) <= 4, f"{name}: {len(new)} metric series appeared in the second half: {new[:20]}"
            _check_rates_stay_flat(name, rows[name])
            _check_books_balance(name, server, tallies[name])
            assert "Traceback" not in server.log(), f"{name}:\n{server.log()[-4000:]}"
        assert fast.stats()["faults_pending"] == 0  # every injected fault met the request it was meant for
        assert slow.stats()["calls"].get("stream_cancelled", 0) > 0  # the disconnects reached the upstream
    finally:
        for server in proxies.values():
            server.proc.terminate()  # all at once: each drains its connections before it exits
        for server in proxies.values():
            server.stop()
