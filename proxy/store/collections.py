"""Where collection entries (knowledge base, semantic cache) live: the embedded memory store or Redis,
so every replica shares them.

Per collection: the entries by id, a version counter bumped by every change, a change log (id ->
version of its last change, deletes included) from which a replica catches up incrementally, the
expiry times, and the insertion order used to evict the oldest entries beyond `max_entries`. A
replica whose version is older than the oldest change still logged reloads everything.

In Redis every key of a collection carries the hash tag `{c:<name>}`, so each change is one Lua
script on one slot and replicas never see half of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
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


def _kept_changes(max_entries: int) -> int:
    return max(_MIN_KEPT_CHANGES, 2 * max_entries)


class MemoryCollectionStore:
    """One process's collections (no Redis): the same semantics as the Redis store."""

    name = "memory"

    def __init__(self) -> None:
        self._c: dict[str, _MemoryCollection] = {}

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


def collection_store(store: Any, key_prefix: str) -> CollectionStore:
    """The collection backend that goes with the proxy's store: Redis when it is Redis, else memory."""
    inner = getattr(store, "inner", store)
    client = getattr(inner, "client", None)
    if client is not None:
        return RedisCollectionStore(client, key_prefix)
    return MemoryCollectionStore()
