"""Runtime virtual keys and the admin audit log in Redis: key records, digest → key id, a version
counter every replica polls, and an append-only audit list (in memory too, for the embedded store).

Every change is one Lua script that also appends its audit entry and bumps the version, so a key
never exists without its audit line and no replica misses a change. All keys share the hash tag
`{vk}`: one slot, so the scripts also run on Redis Cluster.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError

from proxy.store.base import StoreUnavailable

AUDIT_MAX = 10_000  # entries kept; older ones are trimmed

# KEYS: records, digests, version, audit. ARGV: id, digest, record, audit entry, audit max.
_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[1] .. '|') == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('LTRIM', KEYS[4], -tonumber(ARGV[5]), -1)
return redis.call('INCR', KEYS[3])
"""

# Compare-and-set of one record (revoke, rotate): the record must still be what the caller read.
# KEYS: records, digests, version, audit. ARGV: id, expected record, new record, audit entry, audit max,
# then (digest, entry) pairs to set.
_CHANGE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local mine = ARGV[1] .. '|'
for i = 6, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[2], ARGV[i])
  if current and string.sub(current, 1, #mine) ~= mine then return 0 end
end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('LTRIM', KEYS[4], -tonumber(ARGV[5]), -1)
return redis.call('INCR', KEYS[3])
"""

# KEYS: digests, records. ARGV: digest. → {digest entry, record} or nil.
_LOOKUP = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return nil end
local id = string.sub(entry, 1, string.find(entry, '|', 1, true) - 1)
return {entry, redis.call('HGET', KEYS[2], id) or ''}
"""

# KEYS: audit. ARGV: entry, max.
_AUDIT = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return 1
"""

# KEYS: last used, spend. ARGV: (id, last used, spend nano) triples. Last used keeps the latest.
_USE = """
for i = 1, #ARGV, 3 do
  local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > seen then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 2]) end
end
return 1
"""


def digest_entry(key_id: str, until: float | None) -> str:
    """What a digest points at: `id|` (current secret) or `id|<unix s>` (a rotated-out one, valid until then)."""
    return f"{key_id}|{'' if until is None else repr(until)}"


def parse_digest_entry(entry: str) -> tuple[str, float | None]:
    key_id, _, until = entry.partition("|")
    return key_id, float(until) if until else None


class AuditLog(Protocol):
    async def append(self, entry: dict[str, Any]) -> None: ...

    async def read(self, limit: int) -> list[dict[str, Any]]: ...


class MemoryAuditLog:
    """The audit log of a proxy on the embedded store: this process's admin changes only."""

    def __init__(self) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=AUDIT_MAX)

    async def append(self, entry: dict[str, Any]) -> None:
        self._entries.append(entry)

    async def read(self, limit: int) -> list[dict[str, Any]]:
        return list(self._entries)[-limit:]


class KeyConflict(Exception):
    """The record changed between read and write (a concurrent revoke or rotate), or an id collided."""


class RedisKeyStore:
    def __init__(self, client: Any, prefix: str):
        self.client = client
        base = f"{prefix}:{{vk}}:"
        self.records_key, self.digests_key = base + "keys", base + "digests"
        self.version_key, self.audit_key = base + "version", base + "audit"
        self.used_key, self.spend_key = base + "used", base + "spend"
        self._create = client.register_script(_CREATE)
        self._change = client.register_script(_CHANGE)
        self._lookup = client.register_script(_LOOKUP)
        self._audit = client.register_script(_AUDIT)
        self._use = client.register_script(_USE)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    def _change_keys(self) -> list[str]:
        return [self.records_key, self.digests_key, self.version_key, self.audit_key]

    async def create(self, record: dict[str, Any], digest: str, audit: dict[str, Any]) -> int:
        version = await self._call(
            self._create,
            self._change_keys(),
            [record["id"], digest, orjson.dumps(record), orjson.dumps(audit), AUDIT_MAX],
        )
        if not version:
            raise KeyConflict(record["id"])
        return int(version)

    async def change(
        self,
        expected: bytes,
        record: dict[str, Any],
        digests: list[tuple[str, str]],
        audit: dict[str, Any],
    ) -> int:
        """Replace a record read as `expected` (and set digest entries of this key), or KeyConflict."""
        args: list[Any] = [record["id"], expected, orjson.dumps(record), orjson.dumps(audit), AUDIT_MAX]
        for digest, entry in digests:
            args += [digest, entry]
        version = await self._call(self._change, self._change_keys(), args)
        if not version:
            raise KeyConflict(record["id"])
        return int(version)

    async def record(self, key_id: str) -> bytes | None:
        try:
            return await self.client.hget(self.records_key, key_id)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def lookup(self, digest: str) -> tuple[str, bytes] | None:
        """(digest entry, record JSON) for a presented key's digest, or None."""
        found = await self._call(self._lookup, [self.digests_key, self.records_key], [digest])
        if not found:
            return None
        entry, record = found
        return entry.decode(), record

    async def version(self) -> int:
        try:
            return int(await self.client.get(self.version_key) or 0)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def snapshot(self) -> tuple[int, dict[bytes, bytes], dict[bytes, bytes]]:
        """(version, id → record, digest → entry), read in one transaction so they agree."""
        try:
            async with self.client.pipeline(transaction=True) as p:
                p.get(self.version_key)
                p.hgetall(self.records_key)
                p.hgetall(self.digests_key)
                version, records, digests = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return int(version or 0), records, digests

    async def usage(self) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        """(id → last used unix s, id → all-time spend in nano-USD)."""
        try:
            async with self.client.pipeline(transaction=False) as p:
                p.hgetall(self.used_key)
                p.hgetall(self.spend_key)
                used, spend = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return used, spend

    async def add_usage(self, rows: list[tuple[str, float, int]]) -> None:
        args: list[Any] = []
        for key_id, last_used, nano in rows:
            args += [key_id, repr(last_used), nano]
        await self._call(self._use, [self.used_key, self.spend_key], args)

    async def append(self, entry: dict[str, Any]) -> None:
        await self._call(self._audit, [self.audit_key], [orjson.dumps(entry), AUDIT_MAX])

    async def read(self, limit: int) -> list[dict[str, Any]]:
        try:
            rows = await self.client.lrange(self.audit_key, -limit, -1)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return [orjson.loads(r) for r in rows]


def build_key_store(store: Any) -> RedisKeyStore | None:
    """The key store beside a Redis store (or the failure-policy wrapper around one); None otherwise."""
    inner = getattr(store, "inner", store)
    client = getattr(inner, "client", None)
    if getattr(inner, "name", "") != "redis" or client is None:
        return None
    return RedisKeyStore(client, inner.prefix)
