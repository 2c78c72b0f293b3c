"""The Redis store's batching: the calls of one event-loop turn share one round trip (one EVALSHA of the
batch script), each keeps its own result and its own failure, and a dead pooled connection is replaced.
Against the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.config.models import StoreConfig
from proxy.store.base import BudgetScope, LimitWindow, StoreUnavailable, Usage
from proxy.store.redis import RedisStore
from tests.conftest import REDIS_URL, private_redis_keys


@pytest.fixture
async def store() -> AsyncIterator[RedisStore]:
    with private_redis_keys(f"llmptest{uuid.uuid4().hex[:8]}") as prefix:
        s = RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix))
        await s.prepare()
        try:
            yield s
        finally:
            await s.close()


def _count_round_trips(store: RedisStore) -> list[bytes]:
    sent: list[bytes] = []
    batcher = store._batcher
    original = batcher._send

    async def counting(command: bytes):
        sent.append(command)
        return await original(command)

    batcher._send = counting
    return sent


async def test_calls_of_one_loop_turn_share_one_round_trip_and_keep_their_own_results(store: RedisStore) -> None:
    sent = _count_round_trips(store)
    scope = [BudgetScope("t", "team", "day:2026-12-02", 1000, 60)]
    rpm = [LimitWindow("t", "team:rpm", 2, 1)]
    results = await asyncio.gather(
        store.reserve_budget(scope, 400, store.new_write_id()),
        store.reserve_budget(scope, 400, store.new_write_id()),
        store.reserve_budget(scope, 400, store.new_write_id()),
        store.hit_limits(rpm, 1000.0),
        store.hit_limits(rpm, 1000.0),
        store.hit_limits(rpm, 1000.0),
    )
    assert len(sent) == 1
    assert [r.ok for r in results[:3]] == [True, True, False]
    assert results[0].used_nano == (400,) and results[1].used_nano == (800,)
    assert results[2].failed == 0
    assert [r.ok for r in results[3:]] == [True, True, False]
    assert await store.budget_usage(scope) == [(0, 800)]


async def test_a_failing_operation_fails_alone_in_its_batch(store: RedisStore) -> None:
    await store.client.set(store.team_key("t", "spend:total"), "not a hash")
    scope = [BudgetScope("t", "team", "none", 10_000, 0)]
    await store.reserve_budget(scope, 500)
    recorded, settled = await asyncio.gather(
        store.record_usage(Usage("t", "m", 5, 1, 2), "2026-12-02", store.new_write_id()),
        store.settle_budget(scope, 500, 120, store.new_write_id()),
        return_exceptions=True,
    )
    assert isinstance(recorded, StoreUnavailable) and "WRONGTYPE" in str(recorded)
    assert settled is None
    assert await store.budget_usage(scope) == [(120, 0)]


async def test_team_and_model_names_outside_ascii_are_sent_exactly(store: RedisStore) -> None:
    await store.record_usage(Usage("équipe", "modèle-ü", 7, 3, 4), "2026-12-02", store.new_write_id())
    spend = await store.spend(["équipe"], ["2026-12-02"])
    line = spend["équipe"].by_day["2026-12-02"]["modèle-ü"]
    assert (line.requests, line.input_tokens, line.output_tokens, line.cost_nano) == (1, 3, 4, 7)


async def test_a_pooled_connection_killed_meanwhile_is_replaced(store: RedisStore) -> None:
    scope = [BudgetScope("t", "team", "none", 10_000, 0)]
    await store.reserve_budget(scope, 1)  # opens the pooled connection
    own = await store.client.client_id()  # the same pooled connection (the only one)
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await admin.client_kill_filter(_id=own) == 1
    finally:
        await admin.aclose()
    result = await store.reserve_budget(scope, 2)
    assert result.ok and result.used_nano == (3,)
