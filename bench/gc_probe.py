"""Run a server under a stall probe, written as JSON when the process exits (uvicorn exits normally on
SIGTERM, so atexit runs):

  * every garbage collection: when, its generation, its pause;
  * event-loop lag: a callback due every 5 ms records how late it ran;
  * stalls: a watchdog thread that sees the loop silent for over 15 ms takes the main thread's stack
    then (what was running during the stall).

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
import threading
import time
import traceback

_TICK_S = 0.005
_STALL_S = 0.015


def _watch_loop(new_loop, lags: list, stalls: list):
    main = threading.main_thread().ident
    last = [time.perf_counter()]

    def factory():
        loop = new_loop()

        def tick(due: float) -> None:
            now = time.perf_counter()
            last[0] = now
            if now - due > 0.002:
                lags.append((time.time(), (now - due) * 1000))
            loop.call_later(_TICK_S, tick, now + _TICK_S)

        loop.call_soon(tick, time.perf_counter())
        return loop

    def watchdog() -> None:
        seen = 0.0
        while True:
            time.sleep(0.002)
            silent = time.perf_counter() - last[0]
            if silent > _STALL_S and last[0] != seen:
                seen = last[0]
                frame = sys._current_frames().get(main)
                stack = traceback.format_stack(frame)[-8:] if frame is not None else []
                stalls.append((time.time(), silent * 1000, [s.strip().replace("\n", " | ") for s in stack]))

    threading.Thread(target=watchdog, daemon=True).start()
    return factory


def main() -> None:
    out, sep, module, *args = sys.argv[1:]
    if sep != "--":
        raise SystemExit(__doc__)
    pauses: list[tuple[float, int, float]] = []  # (when, generation, pause ms)
    lags: list[tuple[float, float]] = []  # (when, ms late)
    stalls: list = []  # (when, ms silent so far, stack)
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((time.time(), info["generation"], (time.perf_counter() - started[0]) * 1000))

    gc.callbacks.append(on_gc)
    if os.environ.get("BENCH_GC_THRESHOLD"):  # an experiment: other collector thresholds, e.g. "7000,10,10"
        gc.set_threshold(*map(int, os.environ["BENCH_GC_THRESHOLD"].split(",")))
    import uvloop

    uvloop.new_event_loop = _watch_loop(uvloop.new_event_loop, lags, stalls)

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"pid": os.getpid(), "pauses": pauses, "lags": lags, "stalls": stalls}, f)

    atexit.register(dump)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
