"""The Redis store: shared state for every replica pointing at the same Redis.

Every key of a team carries the hash tag `{t:<team>}` so all of a team's updates touch one slot
(Redis Cluster runs multi-key scripts and transactions only within a slot).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.config.models import StoreConfig
from proxy.store.base import SpendLine, StoreUnavailable, TeamSpend, Usage

_DAY_TTL_S = 400 * 86400
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
        self.client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)

    def team_key(self, team: str, suffix: str) -> str:
        return f"{self._prefix}:{{t:{team}}}:{suffix}"

    async def record_usage(self, usage: Usage, day: str) -> None:
        total = self.team_key(usage.team, "spend:total")
        daily = self.team_key(usage.team, f"spend:{day}")
        m = usage.model
        try:
            async with self.client.pipeline(transaction=True) as p:
                for key in (total, daily):
                    p.hincrby(key, f"{m}|requests", 1)
                    p.hincrby(key, f"{m}|in", usage.input_tokens)
                    p.hincrby(key, f"{m}|out", usage.output_tokens)
                    p.hincrby(key, f"{m}|nano", usage.cost_nano)
                p.expire(daily, _DAY_TTL_S)
                await p.execute()
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

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.client.aclose()
