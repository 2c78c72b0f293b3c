"""The Redis store: shared state for every replica pointing at the same Redis (or Redis Cluster,
with a `redis+cluster://host:port` URL).

Every multi-key update is one Lua script, so replicas never interleave a read-modify-write.

Every key of a team carries the hash tag `{t:<team>}` so all of a team's updates touch one slot
(Redis Cluster runs multi-key scripts and transactions only within a slot).
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.config.models import StoreConfig
from proxy.store.base import (
    MAX_LABELS,
    OUTCOMES,
    BudgetScope,
    JudgementCounts,
    Judgements,
    LimitResult,
    LimitWindow,
    PolicyLine,
    Reservation,
    SpendLine,
    StoreUnavailable,
    TeamSpend,
    Usage,
    retry_after,
    window_position,
)
from proxy.store.redis_batch import Batcher

_DAY_TTL_S = 400 * 86400
_WINDOW_TTL_S = 180

# Add one request's usage to the team's all-time and per-day totals. ARGV: model, in, out, nano-USD, TTL.
# KEYS: spend total, spend today, savings total, savings today.
# ARGV: model, in, out, nano-USD, TTL, saved nano-USD, then (policy, saved nano-USD) pairs.
_RECORD = """
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|requests', 1)
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|in', ARGV[2])
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|out', ARGV[3])
  redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|nano', ARGV[4])
  if ARGV[6] ~= '0' then redis.call('HINCRBY', KEYS[i], ARGV[1] .. '|saved', ARGV[6]) end
end
for j = 7, #ARGV, 2 do
  for i = 3, 4 do
    redis.call('HINCRBY', KEYS[i], ARGV[j] .. '|requests', 1)
    redis.call('HINCRBY', KEYS[i], ARGV[j] .. '|nano', ARGV[j + 1])
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if #ARGV > 6 then redis.call('EXPIRE', KEYS[4], ARGV[5]) end
return 1
"""

# One output-token sample of a hold-out arm. KEYS: the policy's hash. ARGV: model|arm, tokens.
_ARM = """
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|n', 1)
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|sum', ARGV[2])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|sumsq', tonumber(ARGV[2]) * tonumber(ARGV[2]))
return 1
"""

# One shadow comparison. KEYS: the policy's hash for the day. ARGV: pair|outcome, TTL.
_JUDGEMENT = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# One retained shadow label: its own key (Redis expires the prompt text exactly at its TTL) and an index of
# the team's labels for the policy, scored by expiry, trimmed of the expired and of the oldest beyond the
# cap (their keys deleted with them). KEYS: index, label key, label key prefix.
# ARGV: label id, label, TTL ms, now ms, cap.
_LABEL = """
local ttl = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do redis.call('DEL', KEYS[3] .. old) end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(last[2])))
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

# Add (or take back, with negative costs) units in current windows without checking. ARGV: costs, TTL.
_ADD = """
local ttl = tonumber(ARGV[#ARGV])
for i = 1, #KEYS do
  if redis.call('INCRBY', KEYS[i], ARGV[i]) < 0 then redis.call('SET', KEYS[i], 0) end
  redis.call('EXPIRE', KEYS[i], ttl)
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

# Spend writes apply at most once. A write whose reply is lost (Redis went away after running it, or
# the client resent it on a new connection) is replayed from the fail-open journal; its write id,
# marked in the same script, makes the replay a no-op. Marks live in one hash per five-minute bucket
# (same hash tag as the write, so one slot) for 15 minutes: replays are exact for outages up to that.
# A mark costs ~75 bytes of Redis memory while it lives (~2-3 writes a request: ~200 MB at 1,000/s).
_ONCE_BUCKET_S = 300
_ONCE_TTL_S = 900
# Prepended to a write script: takes the marker key and the token off the end of KEYS and ARGV.
_ONCE = f"""
local token = table.remove(ARGV)
local marker = table.remove(KEYS)
if redis.call('HSETNX', marker, token, 1) == 0 then return 0 end
redis.call('EXPIRE', marker, {_ONCE_TTL_S})
"""
# A reservation marks its token only when it reserved, so a lost reply can be undone exactly
# (_RELEASE_IF_RESERVED); a resent reservation that already landed answers success again.
_RESERVE_ONCE = """
local token = table.remove(ARGV)
local marker = table.remove(KEYS)
if redis.call('HEXISTS', marker, token) == 1 then
  local zeros = {}
  for i = 1, #KEYS do zeros[i] = '0' end
  return {1, 0, unpack(zeros)}
end
""" + _RESERVE.replace(
    "return {1, 0, unpack(used)}",
    f"redis.call('HSET', marker, token, ARGV[1])\nredis.call('EXPIRE', marker, {_ONCE_TTL_S})\n"
    "return {1, 0, unpack(used)}",
)
# Undo a reservation whose reply was lost, if it landed. KEYS: budget hashes, marker. ARGV: amount, token.
_RELEASE_IF_RESERVED = """
local token = table.remove(ARGV)
local marker = table.remove(KEYS)
if redis.call('HDEL', marker, token) == 0 then return 0 end
for i = 1, #KEYS do
  if redis.call('HINCRBY', KEYS[i], 'reserved', -tonumber(ARGV[1])) < 0 then
    redis.call('HSET', KEYS[i], 'reserved', 0)
  end
end
return 1
"""


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
        elif f == "saved":
            line.saved_nano = n
    return out


def _policy_lines(h: dict[bytes, bytes]) -> dict[str, PolicyLine]:
    out: dict[str, PolicyLine] = {}
    for k, v in h.items():
        policy, _, f = k.decode().rpartition("|")
        line = out.setdefault(policy, PolicyLine())
        if f == "requests":
            line.requests = int(v)
        elif f == "nano":
            line.saved_nano = int(v)
    return out


# Every write and check above as a Lua function of its own KEYS and ARGV, and one script that runs a list
# of them: the store calls queued in one event-loop turn, by all the requests in flight, go to Redis as
# one EVALSHA. Each operation keeps its own atomicity and its own spend-once mark (the batch as a whole
# is atomic too); one that fails (pcall) answers its error in its place and the others still run.
# ARGV: the number of operations, then per operation its name, key count, arg count and args; KEYS: the
# operations' keys in order.
_OPERATIONS = {
    "record": _RECORD,
    "record_once": _ONCE + _RECORD,
    "reserve": _RESERVE,
    "reserve_once": _RESERVE_ONCE,
    "settle": _SETTLE,
    "settle_once": _ONCE + _SETTLE,
    "limits": _LIMITS,
    "add": _ADD,
    "arm": _ARM,
    "arm_once": _ONCE + _ARM,
    "release": _RELEASE_IF_RESERVED,
    "judgement": _JUDGEMENT,
    "judgement_once": _ONCE + _JUDGEMENT,
    "label": _LABEL,
}
_BATCH = (
    "local ops = {}\n"
    + "".join(f"ops['{name}'] = function(KEYS, ARGV)\n{src}\nend\n" for name, src in _OPERATIONS.items())
    + """
local out = {}
local k, a = 0, 1
for i = 1, tonumber(ARGV[1]) do
  local name, nk, na = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 3
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + j] end
  k = k + nk
  a = a + na
  local ok, res = pcall(ops[name], keys, args)
  if not ok then
    if type(res) == 'table' and res.err then out[i] = res else out[i] = redis.error_reply(tostring(res)) end
  elseif res == nil then
    out[i] = false
  else
    out[i] = res
  end
end
return out
"""
)


class RedisStore:
    name = "redis"

    def __init__(self, url: str, config: StoreConfig):
        self._prefix = self.prefix = config.key_prefix
        self._writer = secrets.token_hex(6)
        self._writes = itertools.count()
        if url.startswith("redis+cluster://"):
            self.client = aioredis.RedisCluster.from_url(
                "redis://" + url.removeprefix("redis+cluster://"), socket_connect_timeout=2, socket_timeout=2
            )
        else:
            self.client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        # A single Redis takes every call through the batch script; Redis Cluster runs a multi-key script
        # only within one slot, so there each operation is its own script (keys of one team: one slot).
        self._cluster = url.startswith("redis+cluster://")
        if self._cluster:
            self._operations = {name: self.client.register_script(src) for name, src in _OPERATIONS.items()}
            self._scripts = list(self._operations.values())
            self._batcher = None
        else:
            batch = self.client.register_script(_BATCH)
            self._scripts = [batch]
            self._batcher = Batcher(self.client, batch)

    async def _run(self, operation: str, keys: list[str], args: list[Any]) -> Any:
        try:
            if self._batcher is not None:
                return await self._batcher.call(operation, keys, args)
            return await self._operations[operation](keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def prepare(self) -> None:
        """Load the Lua scripts on every primary up front, so no request takes the NOSCRIPT path."""
        try:
            for script in self._scripts:
                await self.client.script_load(script.script)
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    def team_key(self, team: str, suffix: str) -> str:
        return f"{self._prefix}:{{t:{team}}}:{suffix}"

    def new_write_id(self) -> str:
        """An id for one write, kept by the journal across replays: `bucket:token`, the token unique to
        this store object (a random prefix, then a counter: cheaper than a random token per write)."""
        return f"{int(time.time()) // _ONCE_BUCKET_S}:{self._writer}{next(self._writes):x}"

    @staticmethod
    def _once(tagged_prefix: str, write_id: str, keys: list[str], args: list[Any]) -> tuple[list[str], list[Any]]:
        bucket, token = write_id.split(":", 1)
        return [*keys, f"{tagged_prefix}once:{bucket}"], [*args, token]

    async def record_usage(self, usage: Usage, day: str, write_id: str | None = None) -> None:
        keys = [
            self.team_key(usage.team, "spend:total"),
            self.team_key(usage.team, f"spend:{day}"),
            self.team_key(usage.team, "savings:total"),
            self.team_key(usage.team, f"savings:{day}"),
        ]
        args = [usage.model, usage.input_tokens, usage.output_tokens, usage.cost_nano, _DAY_TTL_S, usage.saved_nano]
        for policy, nano in usage.saved_by_policy:
            args += [policy, nano]
        if write_id is None:
            await self._run("record", keys, args)
            return
        await self._run("record_once", *self._once(self.team_key(usage.team, ""), write_id, keys, args))

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]:
        try:
            async with self.client.pipeline(transaction=False) as p:
                for team in teams:
                    p.hgetall(self.team_key(team, "spend:total"))
                    p.hgetall(self.team_key(team, "savings:total"))
                    for d in days:
                        p.hgetall(self.team_key(team, f"spend:{d}"))
                        p.hgetall(self.team_key(team, f"savings:{d}"))
                results = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        out: dict[str, TeamSpend] = {}
        it = iter(results)
        for team in teams:
            ts = TeamSpend(total=_line(next(it)), policies=_policy_lines(next(it)))
            for d in days:
                day, day_policies = _line(next(it)), _policy_lines(next(it))
                if day:
                    ts.by_day[d] = day
                if day_policies:
                    ts.policies_by_day[d] = day_policies
            out[team] = ts
        return out

    async def record_arm(self, policy: str, model: str, arm: str, tokens: int, write_id: str | None = None) -> None:
        keys, args = [f"{self._prefix}:{{p:{policy}}}:holdout"], [f"{model}|{arm}", tokens]
        if write_id is None:
            await self._run("arm", keys, args)
            return
        await self._run("arm_once", *self._once(f"{self._prefix}:{{p:{policy}}}:", write_id, keys, args))

    async def arm_stats(self, policy: str) -> dict[tuple[str, str], tuple[int, int, int]]:
        try:
            raw = await self.client.hgetall(f"{self._prefix}:{{p:{policy}}}:holdout")
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        stats: dict[tuple[str, str], list[int]] = {}
        for k, v in raw.items():
            model, arm, f = k.decode().rsplit("|", 2)
            stats.setdefault((model, arm), [0, 0, 0])[("n", "sum", "sumsq").index(f)] = int(v)
        return {k: (v[0], v[1], v[2]) for k, v in stats.items()}

    def _judgement_key(self, policy: str, day: str) -> str:
        return f"{self._prefix}:{{p:{policy}}}:shadow:{day}"

    async def record_judgement(
        self, policy: str, pair: str, day: str, outcome: str, write_id: str | None = None
    ) -> None:
        keys, args = [self._judgement_key(policy, day)], [f"{pair}|{outcome}", _DAY_TTL_S]
        if write_id is None:
            await self._run("judgement", keys, args)
            return
        await self._run("judgement_once", *self._once(f"{self._prefix}:{{p:{policy}}}:", write_id, keys, args))

    async def judgements(self, policies: list[str], days: list[str]) -> Judgements:
        try:
            async with self.client.pipeline(transaction=False) as p:
                for policy in policies:
                    for day in days:
                        p.hgetall(self._judgement_key(policy, day))
                results = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        out: dict[str, dict[tuple[str, str], JudgementCounts]] = {}
        it = iter(results)
        for policy in policies:
            rows: dict[tuple[str, str], JudgementCounts] = {}
            for day in days:
                for k, v in next(it).items():
                    pair, _, outcome = k.decode().rpartition("|")
                    if outcome in OUTCOMES:
                        counts = rows.setdefault((day, pair), JudgementCounts())
                        setattr(counts, outcome, int(v))
            out[policy] = rows
        return out

    def _floor_stop_key(self, policy: str) -> str:
        return f"{self._prefix}:{{p:{policy}}}:floor_stop"

    async def put_floor_stop(self, policy: str, stop: bytes, ttl_s: float) -> None:
        try:
            await self.client.set(self._floor_stop_key(policy), stop, px=max(1, round(ttl_s * 1000)))
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def floor_stops(self, policies: list[str]) -> dict[str, bytes]:
        out = {}
        try:
            for policy in policies:  # one key per policy, each in its policy's slot (Redis Cluster): no MGET
                stop = await self.client.get(self._floor_stop_key(policy))
                if stop is not None:
                    out[policy] = stop
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return out

    def _label_keys(self, team: str, policy: str) -> tuple[str, str]:
        """The index of a team's labels for a policy, and the prefix of each label's key."""
        return self.team_key(team, f"labels:{policy}"), self.team_key(team, f"label:{policy}:")

    async def put_label(self, team: str, policy: str, label: bytes, ttl_s: float) -> None:
        index, prefix = self._label_keys(team, policy)
        # Time first: labels of one millisecond (one score) sort by id, in the order they came.
        now_ns = time.time_ns()
        label_id = f"{now_ns:020d}-{self._writer}{next(self._writes):x}"
        now_ms = now_ns // 1_000_000
        keys = [index, prefix + label_id, prefix]
        await self._run("label", keys, [label_id, label.decode(), max(1, round(ttl_s * 1000)), now_ms, MAX_LABELS])

    async def labels(self, team: str, policy: str) -> list[bytes]:
        index, prefix = self._label_keys(team, policy)
        try:
            ids = await self.client.zrangebyscore(index, int(time.time() * 1000), "+inf")
            if not ids:
                return []
            values = await self.client.mget([prefix + i.decode() for i in ids])
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e
        return [v for v in values if v is not None]

    def _budget_key(self, scope: BudgetScope) -> str:
        return self.team_key(scope.team, f"budget:{scope.name}:{scope.period}")

    def _window_key(self, w: LimitWindow, index: int) -> str:
        return self.team_key(w.team, f"rl:{w.name}:{index}")

    async def reserve_budget(
        self, scopes: list[BudgetScope], amount_nano: int, write_id: str | None = None
    ) -> Reservation:
        keys = [self._budget_key(s) for s in scopes]
        args = [amount_nano, *(s.limit_nano for s in scopes), *(s.ttl_s for s in scopes)]
        if write_id is None:
            ok, failed, *used = await self._run("reserve", keys, args)
        else:
            once = self._once(self.team_key(scopes[0].team, ""), write_id, keys, args)
            ok, failed, *used = await self._run("reserve_once", *once)
        return Reservation(bool(ok), tuple(int(float(u)) for u in used), int(failed) - 1 if not ok else None)

    async def release_if_reserved(self, scopes: list[BudgetScope], amount_nano: int, write_id: str) -> None:
        """Undo the reservation `write_id` made, if it did (its reply was lost)."""
        keys = [self._budget_key(s) for s in scopes]
        await self._run("release", *self._once(self.team_key(scopes[0].team, ""), write_id, keys, [amount_nano]))

    async def settle_budget(
        self, scopes: list[BudgetScope], reserved_nano: int, actual_nano: int, write_id: str | None = None
    ) -> None:
        keys, args = [self._budget_key(s) for s in scopes], [reserved_nano, actual_nano]
        if write_id is None:
            await self._run("settle", keys, args)
            return
        await self._run("settle_once", *self._once(self.team_key(scopes[0].team, ""), write_id, keys, args))

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
        ok, failed, *values = await self._run("limits", keys, args)
        if not ok:
            i = int(failed) - 1
            prev, curr = float(values[0]), float(values[1])
            w = windows[i]
            return LimitResult(False, (prev * (1 - frac) + curr,), i, retry_after(prev, curr, frac, w.limit, w.cost))
        pairs = [(float(values[2 * i]), float(values[2 * i + 1])) for i in range(len(windows))]
        return LimitResult(True, tuple(prev * (1 - frac) + curr for prev, curr in pairs))

    async def add_to_limits(self, windows: list[LimitWindow], now: float) -> None:
        index, _ = window_position(now)
        keys = [self._window_key(w, index) for w in windows]
        await self._run("add", keys, [*(w.cost for w in windows), _WINDOW_TTL_S])

    async def put_conversation(self, team: str, response_id: str, data: bytes, ttl_s: float) -> None:
        try:
            await self.client.set(self.team_key(team, f"resp:{response_id}"), data, px=max(1, round(ttl_s * 1000)))
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def get_conversation(self, team: str, response_id: str) -> bytes | None:
        try:
            return await self.client.get(self.team_key(team, f"resp:{response_id}"))
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def delete_conversation(self, team: str, response_id: str) -> bool:
        try:
            return bool(await self.client.delete(self.team_key(team, f"resp:{response_id}")))
        except (RedisError, OSError) as e:
            raise StoreUnavailable(str(e)) from e

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.client.aclose()
