"""The Redis store: shared state for every replica pointing at the same Redis (or Redis Cluster,
with a `redis+cluster://host:port` URL).

Every multi-key update is one Lua script, so replicas never interleave a read-modify-write.

Every key of a team carries the hash tag `{t:<team>}` so all of a team's updates touch one slot
(Redis Cluster runs multi-key scripts and transactions only within a slot).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.config.models import StoreConfig
from proxy.store.base import (
    BudgetScope,
    LimitResult,
    LimitWindow,
    Reservation,
    SpendLine,
    StoreUnavailable,
    TeamSpend,
    Usage,
    retry_after,
    window_position,
)

_DAY_TTL_S = 400 * 86400
_WINDOW_TTL_S = 180

# Add one request's usage to the team's all-time and per-day totals. ARGV: model, in, out, nano-USD, TTL.
_RECORD = """
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|requests', 1)
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|in', ARGV[2])
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|out', ARGV[3])
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|nano', ARGV[4])
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""

# Reserve `amount` in every budget scope, or in none: all checks before any write.
# KEYS: one hash per scope. ARGV: amount, then the limit of each scope, then the TTL of each scope.
_RESERVE = """
local amount = tonumber(ARGV[1])
local n = #KEYS
local used = {}
for i = 1, n do
  local spent = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', KEYS[i], 'reserved') or '0')
  if spent + reserved + amount > tonumber(ARGV[1 + i]) then
    used[i] = tostring(spent + reserved)
    return {0, i, unpack(used)}
  end
  used[i] = tostring(spent + reserved + amount)
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  local ttl = tonumber(ARGV[1 + n + i])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
return {1, 0, unpack(used)}
"""

# Release a reservation and add the real cost. ARGV: reserved amount, actual amount.
_SETTLE = """
local reserved = tonumber(ARGV[1])
local actual = tonumber(ARGV[2])
for i = 1, #KEYS do
  if reserved > 0 and redis.call('HINCRBY', KEYS[i], 'reserved', -reserved) < 0 then
    redis.call('HSET', KEYS[i], 'reserved', 0)
  end
  if actual ~= 0 then redis.call('HINCRBY', KEYS[i], 'spent', actual) end
end
return 1
"""

# Sliding-window rate limits, all or nothing. KEYS: (previous, current) window counter per limit.
# ARGV: fraction of the current window elapsed, then (limit, cost) per limit, then the TTL.
_LIMITS = """
local frac = tonumber(ARGV[1])
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local prev = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local curr = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local limit = tonumber(ARGV[2 * i])
  local cost = tonumber(ARGV[2 * i + 1])
  if prev * (1 - frac) + curr + cost > limit then
    return {0, i, tostring(prev), tostring(curr)}
  end
  out[2 * i - 1] = tostring(prev)
  out[2 * i] = tostring(curr + cost)
end
local ttl = tonumber(ARGV[2 * n + 2])
for i = 1, n do
  redis.call('INCRBY', KEYS[2 * i], ARGV[2 * i + 1])
  redis.call('EXPIRE', KEYS[2 * i], ttl)
end
return {1, 0, unpack(out)}
"""
_FIELDS = ("requests", "in", "out", "nano")


def _line(h: dict[bytes, bytes]) -> dict[str, SpendLine]:
    out: dict[str, SpendLine] = {}
    for k, v in h.items():
        model, _, f = k.decode().rpartition("|")
        line = out.setdefault(model, SpendLine())
        n = int(v)
        if f == "requests":
            line.requests = n
        elif f == "in":
            line.input_tokens = n
        elif f == "out":
            line.output_tokens = n
        elif f == "nano":
            line.cost_nano = n
    return out


class RedisStore:
    name = "redis"

    def __init__(self, url: str, config: StoreConfig):
        self._prefix = config.key_prefix
        if url.startswith("redis+cluster://"):
            self.client = aioredis.RedisCluster.from_url(
                "redis://" + url.removeprefix("redis+cluster://"), socket_connect_timeout=2, socket_timeout=2
            )
        else:
            self.client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self._record = self.client.register_script(_RECORD)
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)
        self._limits = self.client.register_script(_LIMITS)

    async def prepare(self) -> None:
        """Load the Lua scripts on every primary up front, so no request takes the NOSCRIPT path."""
        try:
            for script in (self._record, self._reserve, self._settle, self._limits):
                await self.client.script_load(script.script)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    def team_key(self, team: str, suffix: str) -> str:
        return f"{self._prefix}:{{t:{team}}}:{suffix}"

    async def record_usage(self, usage: Usage, day: str) -> None:
        keys = [self.team_key(usage.team, "spend:total"), self.team_key(usage.team, f"spend:{day}")]
        args = [usage.model, usage.input_tokens, usage.output_tokens, usage.cost_nano, _DAY_TTL_S]
        try:
            await self._record(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]:
        try:
            async with self.client.pipeline(transaction=False) as p:
                for team in teams:
                    p.hgetall(self.team_key(team, "spend:total"))
                    for d in days:
                        p.hgetall(self.team_key(team, f"spend:{d}"))
                results = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        out: dict[str, TeamSpend] = {}
        it = iter(results)
        for team in teams:
            ts = TeamSpend(total=_line(next(it)))
            for d in days:
                day = _line(next(it))
                if day:
                    ts.by_day[d] = day
            out[team] = ts
        return out

    def _budget_key(self, scope: BudgetScope) -> str:
        return self.team_key(scope.team, f"budget:{scope.name}:{scope.period}")

    def _window_key(self, w: LimitWindow, index: int) -> str:
        return self.team_key(w.team, f"rl:{w.name}:{index}")

    async def reserve_budget(self, scopes: list[BudgetScope], amount_nano: int) -> Reservation:
        keys = [self._budget_key(s) for s in scopes]
        args = [amount_nano, *(s.limit_nano for s in scopes), *(s.ttl_s for s in scopes)]
        try:
            ok, failed, *used = await self._reserve(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return Reservation(bool(ok), tuple(int(float(u)) for u in used), int(failed) - 1 if not ok else None)

    async def settle_budget(self, scopes: list[BudgetScope], reserved_nano: int, actual_nano: int) -> None:
        try:
            await self._settle(keys=[self._budget_key(s) for s in scopes], args=[reserved_nano, actual_nano])
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def budget_usage(self, scopes: list[BudgetScope]) -> list[tuple[int, int]]:
        try:
            async with self.client.pipeline(transaction=False) as p:
                for s in scopes:
                    p.hmget(self._budget_key(s), "spent", "reserved")
                rows = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return [(int(spent or 0), int(reserved or 0)) for spent, reserved in rows]

    async def hit_limits(self, windows: list[LimitWindow], now: float) -> LimitResult:
        index, frac = window_position(now)
        keys: list[str] = []
        args: list[float | int] = [frac]
        for w in windows:
            keys += [self._window_key(w, index - 1), self._window_key(w, index)]
            args += [w.limit, w.cost]
        args.append(_WINDOW_TTL_S)
        try:
            ok, failed, *values = await self._limits(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        if not ok:
            i = int(failed) - 1
            prev, curr = float(values[0]), float(values[1])
            w = windows[i]
            return LimitResult(False, (prev * (1 - frac) + curr,), i, retry_after(prev, curr, frac, w.limit, w.cost))
        pairs = [(float(values[2 * i]), float(values[2 * i + 1])) for i in range(len(windows))]
        return LimitResult(True, tuple(prev * (1 - frac) + curr for prev, curr in pairs))

    async def add_to_limits(self, windows: list[LimitWindow], now: float) -> None:
        index, _ = window_position(now)
        try:
            async with self.client.pipeline(transaction=False) as p:
                for w in windows:
                    key = self._window_key(w, index)
                    p.incrby(key, w.cost)
                    p.expire(key, _WINDOW_TTL_S)
                await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.client.aclose()
