"""Stored responses for `previous_response_id`: team-scoped, with a bounded lifetime, in the embedded
store and in a real Redis; a store outage is a 503 on reading, never a silent loss of the earlier turns."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from proxy.config.models import StoreConfig
from proxy.errors import StoreDown
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.resilient import FailurePolicyStore
from tests.conftest import REDIS_URL, private_redis_keys


async def _wait_gone(store, team: str, response_id: str) -> None:
    for _ in range(200):  # a poll on the store's own clock, not a sleep standing in for it
        if await store.get_conversation(team, response_id) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stored response outlived its TTL")


async def _exercise(store) -> None:
    await store.put_conversation("alpha", "resp_1", b'{"messages": []}', ttl_s=60)
    assert await store.get_conversation("alpha", "resp_1") == b'{"messages": []}'
    assert await store.get_conversation("beta", "resp_1") is None  # another team's id reads as unknown
    assert not await store.delete_conversation("beta", "resp_1")
    assert await store.delete_conversation("alpha", "resp_1")
    assert await store.get_conversation("alpha", "resp_1") is None
    assert not await store.delete_conversation("alpha", "resp_1")
    await store.put_conversation("alpha", "resp_2", b"x", ttl_s=0.05)
    await _wait_gone(store, "alpha", "resp_2")


async def test_memory_store_keeps_conversations_per_team_until_their_ttl():
    await _exercise(MemoryStore())


async def test_memory_store_is_bounded_oldest_first():
    store = MemoryStore(max_conversations=3)
    for i in range(5):
        await store.put_conversation("alpha", f"resp_{i}", b"x", ttl_s=60)
    assert [await store.get_conversation("alpha", f"resp_{i}") for i in range(5)] == [None, None, b"x", b"x", b"x"]


async def test_redis_store_keeps_conversations_per_team_until_their_ttl():
    with private_redis_keys(f"llmpconv{uuid.uuid4().hex[:8]}") as prefix:
        store = RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix))
        try:
            await _exercise(store)
            await store.put_conversation("alpha", "resp_3", b"y", ttl_s=30)
            ttl = await store.client.pttl(store.team_key("alpha", "resp:resp_3"))
            assert 0 < ttl <= 30_000
        finally:
            await store.close()


async def test_an_unreachable_store_refuses_reads_and_drops_writes():
    inner = RedisStore("redis://127.0.0.1:1/0", StoreConfig(key_prefix="llmpdown"))
    store = FailurePolicyStore(inner, "fail_open")
    try:
        await store.put_conversation("alpha", "resp_1", b"x", ttl_s=60)  # logged, not raised
        with pytest.raises(StoreDown):
            await store.get_conversation("alpha", "resp_1")
        with pytest.raises(StoreDown):
            await store.delete_conversation("alpha", "resp_1")
    finally:
        await inner.close()
