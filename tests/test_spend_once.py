"""Spend writes apply once in Redis: a write the store ran but whose reply was lost is replayed from the
fail-open journal with the same write id and changes nothing; a reservation whose reply was lost is
undone only if it landed."""

from __future__ import annotations

import uuid

import pytest
import redis

from proxy.config.models import StoreConfig
from proxy.store.base import BudgetScope, Usage
from proxy.store.redis import RedisStore
from tests.conftest import REDIS_URL


@pytest.fixture
async def store():
    prefix = f"llmponce{uuid.uuid4().hex[:8]}"
    s = RedisStore(REDIS_URL, StoreConfig(key_prefix=prefix))
    await s.prepare()
    yield s
    await s.close()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


SCOPES = [BudgetScope("alpha", "team", "day:2026-11-29", 10**9, 3600)]


async def test_a_replayed_usage_write_counts_once(store):
    usage = Usage("alpha", "small", 1500, 10, 20)
    write_id = store.new_write_id()
    await store.record_usage(usage, "2026-11-29", write_id)
    await store.record_usage(usage, "2026-11-29", write_id)  # the journal's replay after a lost reply
    await store.record_usage(usage, "2026-11-29", store.new_write_id())  # another request
    line = (await store.spend(["alpha"], ["2026-11-29"]))["alpha"].total["small"]
    assert (line.requests, line.input_tokens, line.output_tokens, line.cost_nano) == (2, 20, 40, 3000)


async def test_a_replayed_settlement_counts_once(store):
    reservation = await store.reserve_budget(SCOPES, 5000, store.new_write_id())
    assert reservation.ok
    write_id = store.new_write_id()
    await store.settle_budget(SCOPES, 5000, 1200, write_id)
    await store.settle_budget(SCOPES, 5000, 1200, write_id)
    assert await store.budget_usage(SCOPES) == [(1200, 0)]


async def test_a_reservation_whose_reply_was_lost_is_undone_only_if_it_landed(store):
    landed = store.new_write_id()
    assert (await store.reserve_budget(SCOPES, 7000, landed)).ok
    never_sent = store.new_write_id()
    await store.release_if_reserved(SCOPES, 3000, never_sent)  # nothing to undo
    assert await store.budget_usage(SCOPES) == [(0, 7000)]
    await store.release_if_reserved(SCOPES, 7000, landed)
    await store.release_if_reserved(SCOPES, 7000, landed)  # replayed twice: undone once
    assert await store.budget_usage(SCOPES) == [(0, 0)]
    # A reservation resent after it landed answers success and reserves nothing more.
    again = store.new_write_id()
    assert (await store.reserve_budget(SCOPES, 4000, again)).ok
    assert (await store.reserve_budget(SCOPES, 4000, again)).ok
    assert await store.budget_usage(SCOPES) == [(0, 4000)]
