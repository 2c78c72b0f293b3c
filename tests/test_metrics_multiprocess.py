"""`serve --workers N`: /metrics, whichever worker answers it, reports what all workers did
(prometheus_client multiprocess mode), and a worker that exits takes its live gauges with it.
Workers share state through Redis; with the in-process memory store, N > 1 is refused up front."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    MASTER_KEY,
    REDIS_URL,
    TEAM_KEYS,
    MockUpstream,
    Server,
    free_port,
    policy_yaml,
    start_process,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
MAX_REQUESTS = 400  # sent in rounds until every worker has answered some


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    ]


def _total(text: str, name: str) -> float:
    return sum(v for _, v in _samples(text, name))


def _per_worker_requests(metrics_dir: Path, scratch: Path) -> dict[int, float]:
    """Requests each worker counted, read from its own file alone (the files are named by pid)."""
    out = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        one = scratch / str(pid)
        one.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, one / f.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(one))
        out[pid] = sum(s.value for m in registry.collect() for s in m.samples if s.name == "llm_proxy_requests_total")
    return out


@pytest.fixture
def workers_proxy(tmp_path: Path, mock: MockUpstream, redis_prefix: str) -> Iterator[tuple[Server, Path]]:
    mock.configure(latency_ms=20)  # requests overlap, so both workers accept some
    port = free_port()
    config = tmp_path / "policy.yaml"
    config.write_text(policy_yaml(mock.url, f"store:\n  key_prefix: {redis_prefix}:workers\n"))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    server = start_process(
        ["serve", "--config", str(config), "--port", str(port), "--workers", str(WORKERS), "--log-level", "warning"],
        port,
        "/healthz",
        tmp_path,
        {"LLM_PROXY_MASTER_KEY": MASTER_KEY, "TMPDIR": str(tmpdir), "LLM_PROXY_REDIS_URL": REDIS_URL},
    )
    try:
        (metrics_dir,) = tmpdir.glob("llm-proxy-metrics-*")
        yield server, metrics_dir
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()
    assert not metrics_dir.exists(), "serve left its metrics folder behind"


def _chat(server: Server, i: int) -> int:
    # A new connection per request: the kernel hands each to whichever worker accepts first.
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "small", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}", "Connection": "close"},
        timeout=30,
    )
    return r.status_code


def test_requests_served_by_two_workers_add_up_in_metrics(workers_proxy, tmp_path: Path):
    server, metrics_dir = workers_proxy
    sent = 0
    per_worker: dict[int, float] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        while sent < MAX_REQUESTS:
            statuses = list(pool.map(lambda i: _chat(server, i), range(sent, sent + 40)))
            assert statuses == [200] * len(statuses), statuses
            sent += len(statuses)
            per_worker = _per_worker_requests(metrics_dir, tmp_path / f"scratch-{sent}")
            if sum(1 for v in per_worker.values() if v > 0) >= WORKERS:
                break
    served = {pid: v for pid, v in per_worker.items() if v > 0}
    assert len(served) == WORKERS, f"after {sent} requests only workers {served} served any"
    # A request is counted when it settles, after its reply is sent: the last few settle a moment later.
    rounds = iter(range(10**6))
    wait_for(
        lambda: sum(_per_worker_requests(metrics_dir, tmp_path / f"settled-{next(rounds)}").values()) == sent,
        f"the workers' counters to add up to the {sent} requests sent",
        timeout=30,
    )

    # Every scrape, on a fresh connection (any worker), sees the sum of both.
    for _ in range(6):
        text = httpx.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
        assert _total(text, "llm_proxy_requests_total") == sent
        assert _total(text, "gen_ai_client_operation_duration_seconds_count") == sent
        journal = _samples(text, "llm_proxy_store_journal_entries")
        assert journal == [({}, 0.0)], journal  # one series (summed over workers), no per-pid copies
        assert "pid=" not in text


def _serve_exit(tmp_path: Path, workers: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    config = tmp_path / "policy.yaml"
    config.write_text(policy_yaml("http://127.0.0.1:9"))
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_REDIS_URL"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--workers",
            workers,
        ],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workers_with_the_memory_store_are_refused_before_binding(tmp_path: Path):
    r = _serve_exit(tmp_path, "2", {})
    assert r.returncode == 2, r.stderr
    assert "serve --workers 2 needs a shared store" in r.stderr
    assert "LLM_PROXY_REDIS_URL" in r.stderr  # the message names the fix
    assert "Uvicorn running" not in r.stderr and "Started server" not in r.stderr


def test_workers_below_one_are_refused(tmp_path: Path):
    r = _serve_exit(tmp_path, "0", {"LLM_PROXY_REDIS_URL": REDIS_URL})
    assert r.returncode == 2, r.stderr
    assert "--workers must be at least 1" in r.stderr


def test_a_worker_that_died_without_cleanup_leaves_no_live_gauges(tmp_path: Path):
    from proxy.http.metrics_export import sweep_dead_workers

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # A process that counts, queues and then dies at once (no shutdown hooks), as a killed worker does.
    code = (
        "import os\n"
        "from proxy import metrics\n"
        "metrics.REQUESTS.labels('alpha', 'small', 'batch', '2xx').inc(3)\n"
        "metrics.BATCH_QUEUE_DEPTH.labels('small').set(5)\n"
        "metrics.BUDGET_REMAINING.labels('alpha').set(7.5)\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)

    def read() -> dict[str, float]:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(metrics_dir))
        return {s.name: s.value for m in registry.collect() for s in m.samples}

    before = read()
    assert before["llm_proxy_batch_queue_depth"] == 5
    dead = sweep_dead_workers(str(metrics_dir))
    assert len(dead) == 1
    after = read()
    assert "llm_proxy_batch_queue_depth" not in after  # a dead worker's queue is empty
    assert after["llm_proxy_requests_total"] == 3  # what it counted still counts
    assert after["llm_proxy_budget_remaining_usd"] == 7.5  # the last budget seen is still true
    assert sweep_dead_workers(str(metrics_dir)) == []
