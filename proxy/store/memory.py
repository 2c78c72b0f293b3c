"""The embedded in-process store: the default when no Redis URL is configured (one replica)."""

from __future__ import annotations

from collections import defaultdict

from proxy.store.base import SpendLine, TeamSpend, Usage


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._total: dict[str, dict[str, SpendLine]] = defaultdict(lambda: defaultdict(SpendLine))
        self._daily: dict[str, dict[str, dict[str, SpendLine]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(SpendLine))
        )

    async def record_usage(self, usage: Usage, day: str) -> None:
        self._total[usage.team][usage.model].add(usage)
        self._daily[usage.team][day][usage.model].add(usage)

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]:
        out: dict[str, TeamSpend] = {}
        for team in teams:
            ts = TeamSpend()
            if team in self._total:
                ts.total = dict(self._total[team])
                ts.by_day = {d: dict(self._daily[team][d]) for d in days if d in self._daily[team]}
            out[team] = ts
        return out

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None
