"""Where collection entries (knowledge base, semantic cache) live: the embedded memory store or Redis,
so every replica shares them.

Per collection: the entries by id, a version counter bumped by every change, a change log (id ->
version of its last change, deletes included) from which a replica catches up incrementally, the
expiry times, and the insertion order used to evict the oldest entries beyond `max_entries`. A
replica whose version is older than the oldest change still logged reloads everything.

In Redis every key of a collection carries the hash tag `{c:<name>}`, so each change is one Lua
script on one slot and replicas never see half of it.

Beside the entries, the verified outcomes of each error bound over a collection (`retrieve: {max_error}`:
counts per similarity band, the similarity each entry judged wrong must exceed, the served hits judged)
and the retrieval answers that feedback may still judge (by request id, for a day), so every replica
learns from the outcomes any of them saw and any replica takes feedback on any replica's answer.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from proxy.store.base import StoreUnavailable

_CHANGES_PER_CALL = 2000
_MIN_KEPT_CHANGES = 10_000


@dataclass(frozen=True, slots=True)
class StoredItem:
    id: str
    raw: bytes
    expires_at: float | None
    created_at: float


@dataclass(slots=True)
class BoundState:
    """The verified outcomes of one error bound over one collection, as every replica shares them."""

    bands: dict[int, tuple[int, int]] = field(default_factory=dict)  # band -> (correct, wrong)
    entry_floor: dict[str, float] = field(default_factory=dict)  # entry -> similarity it must exceed
    served_judged: int = 0
    served_wrong: int = 0
    explored: int = 0
    stopped: bool = False  # its realised error passed the bound: no replica answers until a reload


@dataclass(frozen=True, slots=True)
class Outcome:
    """One verified outcome for an error bound: `band` of the similarity, and for a wrong one the
    similarity its entry must exceed from now on."""

    entry_id: str
    band: int
    correct: bool
    served: bool
    floor: float


@dataclass(frozen=True, slots=True)
class Changes:
    version: int  # the version these changes bring a replica to
    entries: dict[str, bytes | None]  # id -> stored entry; None: deleted
    complete: bool  # False: more changes wait (call again from `version`)


class CollectionStore(Protocol):
    name: str

    async def upsert(self, collection: str, items: list[StoredItem], max_entries: int) -> int:
        """Write all items in one step, evict the oldest beyond max_entries; the new version."""

    async def delete(self, collection: str, ids: list[str]) -> int:
        """Delete the ids that exist; how many did."""

    async def replace_unchanged(self, collection: str, items: list[tuple[str, bytes, bytes]]) -> int:
        """(id, old, new): write `new` only where the entry still is `old`; how many were written."""

    async def changes(self, collection: str, since: int) -> Changes | None:
        """Changes after version `since`, or None when they are no longer logged (reload everything)."""

    async def version(self, collection: str) -> int: ...

    def scan(self, collection: str) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Every entry, in chunks (a full reload; read the version before)."""

    async def purge_expired(self, collection: str, now: float) -> int: ...

    async def page(self, collection: str, offset: int, limit: int) -> tuple[int, list[bytes]]: ...

    async def get(self, collection: str, entry_id: str) -> bytes | None: ...

    async def record_outcome(self, collection: str, bound: str, outcome: Outcome) -> BoundState:
        """Add one outcome to bound `bound` of the collection, atomically; the bound's state after it."""

    async def bound_state(self, collection: str, bound: str) -> BoundState: ...

    async def reset_bound(self, collection: str, bound: str) -> None:
        """Forget every outcome of the bound (a reloaded policy starts it afresh)."""

    async def stop_bound(self, collection: str, bound: str) -> None:
        """Mark the bound stopped, for every replica, until it is reset."""

    async def remember_answer(self, request_id: str, raw: bytes, ttl_s: float) -> None:
        """Keep a retrieval answer that feedback may judge, for `ttl_s`."""

    async def answer(self, request_id: str) -> bytes | None: ...

    async def judge_answer(self, request_id: str, ttl_s: float) -> bool:
        """Mark an answer judged; False when it already was (one verdict per request counts)."""


def apply_outcome(state: BoundState, o: Outcome) -> None:
    correct, wrong = state.bands.get(o.band, (0, 0))
    state.bands[o.band] = (correct + o.correct, wrong + (not o.correct))
    if not o.correct:
        state.entry_floor[o.entry_id] = max(state.entry_floor.get(o.entry_id, -2.0), o.floor)
    if o.served:
        state.served_judged += 1
        state.served_wrong += not o.correct
    else:
        state.explored += 1


def _copy(state: BoundState) -> BoundState:
    return BoundState(
        dict(state.bands),
        dict(state.entry_floor),
        state.served_judged,
        state.served_wrong,
        state.explored,
        state.stopped,
    )


def _kept_changes(max_entries: int) -> int:
    return max(_MIN_KEPT_CHANGES, 2 * max_entries)


class MemoryCollectionStore:
    """One process's collections (no Redis): the same semantics as the Redis store."""

    name = "memory"

    def __init__(self) -> None:
        self._c: dict[str, _MemoryCollection] = {}
        self._bounds: dict[tuple[str, str], BoundState] = {}
        self._answers: dict[str, tuple[bytes, float]] = {}  # request id -> (answer, expires at)
        self._judged: dict[str, float] = {}

    def _get(self, collection: str) -> _MemoryCollection:
        c = self._c.get(collection)
        if c is None:
            c = self._c[collection] = _MemoryCollection()
        return c

    async def upsert(self, collection: str, items: list[StoredItem], max_entries: int) -> int:
        c = self._get(collection)
        c.version += 1
        for item in items:
            c.entries[item.id] = item.raw
            c.changes[item.id] = c.version
            c.order[item.id] = item.created_at
            if item.expires_at is not None:
                c.expiry[item.id] = item.expires_at
            else:
                c.expiry.pop(item.id, None)
        over = len(c.entries) - max_entries
        if over > 0:
            for victim in sorted(c.order, key=c.order.__getitem__)[:over]:
                c.remove(victim)
        c.trim(_kept_changes(max_entries))
        return c.version

    async def delete(self, collection: str, ids: list[str]) -> int:
        c = self._get(collection)
        present = [i for i in ids if i in c.entries]
        if present:
            c.version += 1
            for i in present:
                c.remove(i)
        return len(present)

    async def replace_unchanged(self, collection: str, items: list[tuple[str, bytes, bytes]]) -> int:
        c = self._get(collection)
        done = [(i, new) for i, old, new in items if c.entries.get(i) == old]
        if done:
            c.version += 1
            for i, new in done:
                c.entries[i] = new
                c.changes[i] = c.version
        return len(done)

    async def changes(self, collection: str, since: int) -> Changes | None:
        c = self._get(collection)
        if since < c.floor:
            return None
        ids = sorted((v, i) for i, v in c.changes.items() if v > since)
        batch = ids[:_CHANGES_PER_CALL]
        version = batch[-1][0] if len(ids) > len(batch) else c.version
        return Changes(version, {i: c.entries.get(i) for _, i in batch}, len(ids) == len(batch))

    async def version(self, collection: str) -> int:
        return self._get(collection).version

    async def scan(self, collection: str) -> AsyncIterator[list[tuple[str, bytes]]]:
        items = list(self._get(collection).entries.items())
        for start in range(0, len(items), _CHANGES_PER_CALL):
            yield items[start : start + _CHANGES_PER_CALL]

    async def purge_expired(self, collection: str, now: float) -> int:
        c = self._get(collection)
        expired = [i for i, t in c.expiry.items() if t <= now]
        if expired:
            c.version += 1
            for i in expired:
                c.remove(i)
        return len(expired)

    async def page(self, collection: str, offset: int, limit: int) -> tuple[int, list[bytes]]:
        c = self._get(collection)
        ids = sorted(c.entries, key=lambda i: (c.order.get(i, 0.0), i))  # oldest first, as in Redis
        return len(ids), [c.entries[i] for i in ids[offset : offset + limit]]

    async def get(self, collection: str, entry_id: str) -> bytes | None:
        return self._get(collection).entries.get(entry_id)

    async def record_outcome(self, collection: str, bound: str, outcome: Outcome) -> BoundState:
        state = self._bounds.setdefault((collection, bound), BoundState())
        apply_outcome(state, outcome)
        return _copy(state)

    async def bound_state(self, collection: str, bound: str) -> BoundState:
        return _copy(self._bounds.get((collection, bound)) or BoundState())

    async def reset_bound(self, collection: str, bound: str) -> None:
        self._bounds.pop((collection, bound), None)

    async def stop_bound(self, collection: str, bound: str) -> None:
        self._bounds.setdefault((collection, bound), BoundState()).stopped = True

    async def remember_answer(self, request_id: str, raw: bytes, ttl_s: float) -> None:
        now = time.time()
        self._answers[request_id] = (raw, now + ttl_s)
        if len(self._answers) > _MAX_MEMORY_ANSWERS:  # oldest first: dicts keep insertion order
            for old in list(self._answers)[: len(self._answers) - _MAX_MEMORY_ANSWERS]:
                del self._answers[old]
                self._judged.pop(old, None)

    async def answer(self, request_id: str) -> bytes | None:
        found = self._answers.get(request_id)
        return found[0] if found is not None and found[1] > time.time() else None

    async def judge_answer(self, request_id: str, ttl_s: float) -> bool:
        if self._judged.get(request_id, 0.0) > time.time():
            return False
        self._judged[request_id] = time.time() + ttl_s
        return True


_MAX_MEMORY_ANSWERS = 100_000


class _MemoryCollection:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.changes: dict[str, int] = {}
        self.expiry: dict[str, float] = {}
        self.order: dict[str, float] = {}
        self.version = 0
        self.floor = 0

    def remove(self, entry_id: str) -> None:
        self.entries.pop(entry_id, None)
        self.expiry.pop(entry_id, None)
        self.order.pop(entry_id, None)
        self.changes[entry_id] = self.version

    def trim(self, keep: int) -> None:
        extra = len(self.changes) - keep
        if extra > 0:
            for v, i in sorted((v, i) for i, v in self.changes.items())[:extra]:
                del self.changes[i]
                self.floor = max(self.floor, v)


# KEYS (every script): entries, version, changes, expiry, order, floor

_UPSERT = """
local v = redis.call('INCR', KEYS[2])
local n = tonumber(ARGV[3])
for i = 0, n - 1 do
  local id = ARGV[4 + 4 * i]
  local exp = tonumber(ARGV[6 + 4 * i])
  redis.call('HSET', KEYS[1], id, ARGV[5 + 4 * i])
  redis.call('ZADD', KEYS[3], v, id)
  if exp > 0 then redis.call('ZADD', KEYS[4], exp, id) else redis.call('ZREM', KEYS[4], id) end
  redis.call('ZADD', KEYS[5], ARGV[7 + 4 * i], id)
end
local over = redis.call('HLEN', KEYS[1]) - tonumber(ARGV[1])
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, over - 1)) do
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZADD', KEYS[3], v, id)
  end
end
local extra = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[2])
if extra > 0 then
  local dropped = redis.call('ZRANGE', KEYS[3], extra - 1, extra - 1, 'WITHSCORES')
  redis.call('SET', KEYS[6], dropped[2])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, extra - 1)
end
return v
"""

_DELETE = """
local v = nil
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('HDEL', KEYS[1], id) == 1 then
    if not v then v = redis.call('INCR', KEYS[2]) end
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZADD', KEYS[3], v, id)
    n = n + 1
  end
end
return n
"""

_REPLACE_UNCHANGED = """
local v = nil
local n = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  local current = redis.call('HGET', KEYS[1], id)
  if current and redis.sha1hex(current) == ARGV[i + 1] then
    if not v then v = redis.call('INCR', KEYS[2]) end
    redis.call('HSET', KEYS[1], id, ARGV[i + 2])
    redis.call('ZADD', KEYS[3], v, id)
    n = n + 1
  end
end
return n
"""

_CHANGES = """
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[1])
if since < tonumber(redis.call('GET', KEYS[6]) or '0') then return {v, -1} end
if since >= v then return {v, 0} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {v, #ids / 2}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], ids[i]) or ''
end
return out
"""

_PURGE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, 1000)
if #ids == 0 then return 0 end
local v = redis.call('INCR', KEYS[2])
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
  redis.call('ZADD', KEYS[3], v, id)
end
return #ids
"""


# KEYS[1]: the bound's hash. ARGV: band, correct (1/0), served (1/0), entry id, floor
_RECORD_OUTCOME = """
local h = KEYS[1]
if ARGV[2] == '1' then
  redis.call('HINCRBY', h, 'b:' .. ARGV[1] .. ':c', 1)
else
  redis.call('HINCRBY', h, 'b:' .. ARGV[1] .. ':w', 1)
  local f = 'f:' .. ARGV[4]
  local current = tonumber(redis.call('HGET', h, f) or '-2')
  if current < tonumber(ARGV[5]) then redis.call('HSET', h, f, ARGV[5]) end
end
if ARGV[3] == '1' then
  redis.call('HINCRBY', h, 'served', 1)
  if ARGV[2] ~= '1' then redis.call('HINCRBY', h, 'served_wrong', 1) end
else
  redis.call('HINCRBY', h, 'explored', 1)
end
return redis.call('HGETALL', h)
"""


def _bound_state(fields: dict[bytes, bytes]) -> BoundState:
    state = BoundState()
    for k, v in fields.items():
        name = k.decode()
        if name.startswith("b:"):
            band, kind = name[2:].rsplit(":", 1)
            correct, wrong = state.bands.get(int(band), (0, 0))
            state.bands[int(band)] = (int(v), wrong) if kind == "c" else (correct, int(v))
        elif name.startswith("f:"):
            state.entry_floor[name[2:]] = float(v)
        elif name == "served":
            state.served_judged = int(v)
        elif name == "served_wrong":
            state.served_wrong = int(v)
        elif name == "explored":
            state.explored = int(v)
        elif name == "stopped":
            state.stopped = v == b"1"
    return state


def _down(e: Exception) -> StoreUnavailable:
    return StoreUnavailable(str(e))


class RedisCollectionStore:
    name = "redis"

    def __init__(self, client: Any, key_prefix: str):
        self._client = client
        self._prefix = key_prefix
        self._upsert = client.register_script(_UPSERT)
        self._delete = client.register_script(_DELETE)
        self._replace = client.register_script(_REPLACE_UNCHANGED)
        self._changes = client.register_script(_CHANGES)
        self._purge = client.register_script(_PURGE)
        self._record_outcome = client.register_script(_RECORD_OUTCOME)

    def _keys(self, collection: str) -> list[str]:
        base = f"{self._prefix}:{{c:{collection}}}:"
        return [base + s for s in ("entries", "version", "changes", "expiry", "order", "floor")]

    async def upsert(self, collection: str, items: list[StoredItem], max_entries: int) -> int:
        args: list[Any] = [max_entries, _kept_changes(max_entries), len(items)]
        for item in items:
            args += [item.id, item.raw, item.expires_at or 0, item.created_at]
        try:
            return int(await self._upsert(keys=self._keys(collection), args=args))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def delete(self, collection: str, ids: list[str]) -> int:
        try:
            return int(await self._delete(keys=self._keys(collection), args=ids))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def replace_unchanged(self, collection: str, items: list[tuple[str, bytes, bytes]]) -> int:
        args: list[Any] = []
        for entry_id, old, new in items:
            args += [entry_id, hashlib.sha1(old).hexdigest(), new]  # compared with redis.sha1hex
        try:
            return int(await self._replace(keys=self._keys(collection), args=args))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def changes(self, collection: str, since: int) -> Changes | None:
        try:
            reply = await self._changes(keys=self._keys(collection), args=[since, _CHANGES_PER_CALL])
        except (RedisError, OSError) as e:
            raise _down(e) from e
        version, n = int(reply[0]), int(reply[1])
        if n < 0:
            return None
        entries: dict[str, bytes | None] = {}
        last = version
        for i in range(n):
            entry_id, score, raw = reply[2 + 3 * i : 5 + 3 * i]
            entries[entry_id.decode()] = raw or None
            last = int(float(score))
        complete = n < _CHANGES_PER_CALL
        return Changes(version if complete else last, entries, complete)

    async def version(self, collection: str) -> int:
        try:
            return int(await self._client.get(self._keys(collection)[1]) or 0)
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def scan(self, collection: str) -> AsyncIterator[list[tuple[str, bytes]]]:
        key = self._keys(collection)[0]
        cursor = 0
        while True:
            try:
                cursor, chunk = await self._client.hscan(key, cursor, count=_CHANGES_PER_CALL)
            except (RedisError, OSError) as e:
                raise _down(e) from e
            if chunk:
                yield [(k.decode(), v) for k, v in chunk.items()]
            if int(cursor) == 0:
                return

    async def purge_expired(self, collection: str, now: float) -> int:
        try:
            return int(await self._purge(keys=self._keys(collection), args=[now]))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def page(self, collection: str, offset: int, limit: int) -> tuple[int, list[bytes]]:
        keys = self._keys(collection)
        try:
            total = int(await self._client.hlen(keys[0]))
            ids = await self._client.zrange(keys[4], offset, offset + limit - 1)
            raws = await self._client.hmget(keys[0], ids) if ids else []
        except (RedisError, OSError) as e:
            raise _down(e) from e
        return total, [r for r in raws if r]

    async def get(self, collection: str, entry_id: str) -> bytes | None:
        try:
            return await self._client.hget(self._keys(collection)[0], entry_id)
        except (RedisError, OSError) as e:
            raise _down(e) from e

    def _bound_key(self, collection: str, bound: str) -> str:
        return f"{self._prefix}:{{c:{collection}}}:bound:{bound}"

    def _answer_key(self, request_id: str) -> str:
        # Tagged by request, like every key: the answer and its verdict mark share one Cluster slot.
        return f"{self._prefix}:{{a:{request_id}}}:answer"

    async def record_outcome(self, collection: str, bound: str, outcome: Outcome) -> BoundState:
        args = [outcome.band, int(outcome.correct), int(outcome.served), outcome.entry_id, repr(outcome.floor)]
        try:
            reply = await self._record_outcome(keys=[self._bound_key(collection, bound)], args=args)
        except (RedisError, OSError) as e:
            raise _down(e) from e
        return _bound_state(dict(zip(reply[::2], reply[1::2], strict=True)))

    async def bound_state(self, collection: str, bound: str) -> BoundState:
        try:
            return _bound_state(await self._client.hgetall(self._bound_key(collection, bound)))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def reset_bound(self, collection: str, bound: str) -> None:
        try:
            await self._client.delete(self._bound_key(collection, bound))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def stop_bound(self, collection: str, bound: str) -> None:
        try:
            await self._client.hset(self._bound_key(collection, bound), "stopped", b"1")
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def remember_answer(self, request_id: str, raw: bytes, ttl_s: float) -> None:
        try:
            await self._client.set(self._answer_key(request_id), raw, px=max(1, int(ttl_s * 1000)))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def answer(self, request_id: str) -> bytes | None:
        try:
            return await self._client.get(self._answer_key(request_id))
        except (RedisError, OSError) as e:
            raise _down(e) from e

    async def judge_answer(self, request_id: str, ttl_s: float) -> bool:
        key = self._answer_key(request_id) + ":judged"
        try:
            return bool(await self._client.set(key, b"1", nx=True, px=max(1, int(ttl_s * 1000))))
        except (RedisError, OSError) as e:
            raise _down(e) from e


def collection_store(store: Any, key_prefix: str) -> CollectionStore:
    """The collection backend that goes with the proxy's store: Redis when it is Redis, else memory."""
    inner = getattr(store, "inner", store)
    client = getattr(inner, "client", None)
    if client is not None:
        return RedisCollectionStore(client, key_prefix)
    return MemoryCollectionStore()
