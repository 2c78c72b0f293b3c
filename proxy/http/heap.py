"""Keep the start-up heap out of the garbage collector's walks.

Start-up leaves hundreds of thousands of long-lived objects (pydantic models, the price map, litellm's
and tiktoken's tables, the runtime). Python's full (generation 2) collection walks all of them, on the
event loop: a stall of tens of milliseconds every few seconds under load, which every request in flight
waits out (the p99 at concurrency). `gc.freeze()` moves everything alive now into a permanent
generation the collector never walks; requests' own garbage is collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then freeze what is left: call when start-up (or a reload) has built its objects,
    in every worker process (each has its own heap)."""
    gc.collect()
    gc.freeze()


def refreeze_after_reload() -> None:
    """A reload replaces the runtime: the frozen old one would never be collected (its cycles stay in
    the permanent generation), so unfreeze, collect it, and freeze the new heap. One full collection
    per reload, which is what the collector did every few seconds under load before freezing."""
    gc.unfreeze()
    freeze_startup_heap()
