"""The garbage collector stays off the request path: the start-up heap is frozen, and a served request
leaves no reference cycle behind (it is freed by reference counting, not by a collector walk)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from proxy.config import load_policy_file
from proxy.http.gateway import _ClientWatch
from proxy.http.state import ProxyState
from proxy.pipeline.context import RequestContext
from proxy.wire.chat import CHAT
from tests.conftest import policy_yaml


async def _never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def test_client_watch_leaves_no_cycle_holding_the_request() -> None:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        ctx = RequestContext(request_id="r1", endpoint=CHAT.endpoint, headers={}, wire=CHAT)
        watch = _ClientWatch(_never_disconnects, ctx)
        await asyncio.sleep(0)  # the watcher is now waiting in receive()
        watch.done()
        for _ in range(3):  # the cancellation is delivered and the watcher task ends
            await asyncio.sleep(0)
        del watch, ctx
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, RequestContext | _ClientWatch)]
        assert held == [], "a finished request's context was left in a reference cycle"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_startup_heap_is_frozen_and_a_reload_refreezes(tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(policy_yaml("http://127.0.0.1:9"))
    gc.unfreeze()
    state = ProxyState(load_policy_file(str(config)), str(config), None, None)
    try:
        await state.start()
        frozen = gc.get_freeze_count()
        assert frozen > 0, "start-up did not freeze its heap"
        runtime = state.runtime
        state.apply_policy(load_policy_file(str(config)))  # a reload
        assert state.runtime is not runtime
        assert gc.get_freeze_count() > 0, "a reload left the new heap unfrozen"
        await state.tokenizers_warmed()
    finally:
        await state.stop()
        gc.unfreeze()
