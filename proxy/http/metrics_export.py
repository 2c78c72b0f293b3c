"""What `/metrics` serves: this process's registry, or under `serve --workers N` the values of every
worker, which prometheus_client's multiprocess mode keeps in files under PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

log = logging.getLogger("llm_proxy")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The gauges a worker's exit must take away (livesum, liveall, livemax, ...): prometheus_client's file names.
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir() -> str:
    """A fresh folder for the workers' metric files, put in the environment the workers inherit.

    It must be set before a worker imports prometheus_client (it picks its value store at import),
    and it must be empty: files left by an earlier run would be counted again.
    """
    path = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_multiprocess_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == path:
        del os.environ[MULTIPROC_ENV]


def render_metrics() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    # A fresh registry per scrape, as prometheus_client's multiprocess docs prescribe: it reads every
    # worker's files (counters and histograms summed, gauges as their multiprocess_mode says).
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_workers(path: str | None = None) -> list[int]:
    """Drop the live gauges of workers that died without cleaning up (killed, crashed); their counters stay."""
    path = path or multiprocess_dir()
    if path is None:
        return []
    dead = set()
    for f in Path(path).glob("gauge_live*.db"):
        m = _LIVE_GAUGE_FILE.match(f.name)
        if m and not _alive(int(m.group(1))):
            dead.add(int(m.group(1)))
    for pid in sorted(dead):
        multiprocess.mark_process_dead(pid, path)
    if dead:
        log.info("metrics: cleared the live gauges of exited workers %s", sorted(dead))
    return sorted(dead)


def worker_started() -> None:
    if multiprocess_dir() is not None:
        sweep_dead_workers()


def worker_stopped() -> None:
    """A worker leaving: its queue depths and in-flight counts no longer add to the sum."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(os.getpid(), path)
