"""The budget ledger: which (team, key, period) counters a budget draws on, their ids in the store, and
how much of a team's budget is used."""

from __future__ import annotations

import calendar
import math
import time
from typing import Any

from proxy import metrics
from proxy.config.models import BudgetConfig, PolicyFile
from proxy.store.base import NANO, BudgetScope, Store, to_nano

_PERIOD_TTL_S = {"day": 3 * 86400, "week": 15 * 86400, "month": 63 * 86400, "none": 0}


def period_id(period: str, now: float) -> str:
    t = time.gmtime(now)
    if period == "day":
        return time.strftime("day:%Y-%m-%d", t)
    if period == "week":
        return time.strftime("week:%G-W%V", t)
    if period == "month":
        return time.strftime("month:%Y-%m", t)
    return "none"


def seconds_until_reset(period: str, now: float) -> int | None:
    """Whole seconds until the period's counter starts again (UTC midnight, Monday, the 1st); None for
    `none`, which never resets."""
    if period == "none":
        return None
    day_start = (now // 86400) * 86400
    if period == "day":
        reset = day_start + 86400
    elif period == "week":
        reset = day_start + (7 - time.gmtime(now).tm_wday) * 86400  # the next Monday (ISO weeks)
    else:
        t = time.gmtime(now)
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        reset = calendar.timegm((year, month, 1, 0, 0, 0))
    return max(1, math.ceil(reset - now))


def budget_headers(scope: BudgetScope, period: str, used_nano: int, now: float) -> dict[str, str]:
    """`x-ratelimit-*-budget` headers of one budget scope: its limit and what is left, in USD, and when
    it resets (a duration as OpenAI writes them, `3600s`; absent for `period: none`)."""
    headers = {
        "x-ratelimit-limit-budget": f"{scope.limit_nano / NANO:.6f}",
        "x-ratelimit-remaining-budget": f"{max(0, scope.limit_nano - used_nano) / NANO:.6f}",
    }
    reset = seconds_until_reset(period, now)
    if reset is not None:
        headers["x-ratelimit-reset-budget"] = f"{reset}s"
    return headers


def scope_for(team: str, name: str, cfg: BudgetConfig, now: float) -> BudgetScope:
    return BudgetScope(team, name, period_id(cfg.period, now), to_nano(cfg.usd), _PERIOD_TTL_S[cfg.period])


class BudgetLedger:
    """The budgets of one policy file over the store: the scopes a (team, key) draws on, how much of
    the team's budget is used (cached per period, refreshed by every reservation and settlement)."""

    def __init__(self, policy: PolicyFile, store: Store):
        self._teams = policy.teams
        self.store = store
        self._used_fraction: dict[str, tuple[str, float]] = {}  # team -> (period, last known fraction)
        # (team, key) -> (UTC day number, its scopes): periods change only at midnight UTC, so the
        # scopes (period ids from strftime, key names) are built once a day per key, not per request.
        self._scopes: dict[tuple[str | None, str | None, bool], tuple[int, list[tuple[BudgetScope, BudgetConfig]]]] = {}

    def scopes(
        self, team: str | None, key_id: str | None, now: float, rights: Any = None
    ) -> list[tuple[BudgetScope, BudgetConfig]]:
        """The scopes a request draws on; `rights` (a runtime key's KeyRights) adds the key's own budget."""
        day = int(now // 86400)
        cached = self._scopes.get((team, key_id, rights is not None))
        if cached is not None and cached[0] == day:
            return cached[1]
        cfg = self._teams.get(team)
        if cfg is None:
            return []
        out = []
        if cfg.budget is not None:
            out.append((scope_for(team, "team", cfg.budget, now), cfg.budget))
        if cfg.key_budget is not None:
            out.append((scope_for(team, f"key:{key_id}", cfg.key_budget, now), cfg.key_budget))
        if rights is not None and rights.budget is not None:  # a runtime key's own budget, on top of the team's
            out.append((scope_for(team, f"vkey:{rights.id}", rights.budget, now), rights.budget))
        if len(self._scopes) > 65536:  # keys are bounded by the config; this bounds a pathological one
            self._scopes.clear()
        self._scopes[(team, key_id, rights is not None)] = (day, out)
        return out

    async def used_fraction(self, team: str | None, key_id: str | None) -> float:
        """How much of the team's budget is spent or reserved (0..1): for `budget_used_above`."""
        scopes = self.scopes(team, key_id, time.time())
        if not scopes:
            return 0.0
        scope, _ = scopes[0]
        known = self._used_fraction.get(team)
        if known is not None and known[0] == scope.period:
            return known[1]
        (spent, reserved), *_ = await self.store.budget_usage([scope])
        return self.remember(scope, spent + reserved)

    def remember(self, scope: BudgetScope, used_nano: int) -> float:
        fraction = min(1.0, used_nano / scope.limit_nano) if scope.limit_nano else 1.0
        if scope.name == "team":
            self._used_fraction[scope.team] = (scope.period, fraction)
            metrics.child(metrics.BUDGET_REMAINING, scope.team).set(max(0, scope.limit_nano - used_nano) / NANO)
        return fraction

    def settled(self, scope: BudgetScope, reserved_nano: int, actual_nano: int) -> None:
        """Keep the cached fraction of the team's budget in step with a settlement."""
        if scope.name != "team" or scope.team not in self._used_fraction:
            return
        period, fraction = self._used_fraction[scope.team]
        if period == scope.period:
            used = fraction * scope.limit_nano - reserved_nano + actual_nano
            self.remember(scope, max(0, int(used)))
