"""Run a server under a garbage-collector probe: every collection's generation and pause, written as
JSON when the process exits (uvicorn exits normally on SIGTERM, so atexit runs).

Usage: python bench/gc_probe.py OUT.json -- MODULE [ARGS...]   (runs `python -m MODULE ARGS...`)
Run by path, so it works from any checkout: the checkout under test comes first on PYTHONPATH.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import time


def main() -> None:
    out, sep, module, *args = sys.argv[1:]
    if sep != "--":
        raise SystemExit(__doc__)
    pauses: list[tuple[float, int, float]] = []  # (when, generation, pause ms)
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((time.time(), info["generation"], (time.perf_counter() - started[0]) * 1000))

    gc.callbacks.append(on_gc)
    if os.environ.get("BENCH_GC_THRESHOLD"):  # an experiment: other collector thresholds, e.g. "7000,10,10"
        gc.set_threshold(*map(int, os.environ["BENCH_GC_THRESHOLD"].split(",")))

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"pid": os.getpid(), "pauses": pauses}, f)

    atexit.register(dump)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
