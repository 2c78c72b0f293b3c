"""Budget scopes: which (team, key, period) counters a budget draws on, and their ids in the store."""

from __future__ import annotations

import time

from proxy.config.models import BudgetConfig
from proxy.store.base import BudgetScope, to_nano

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


def scope_for(team: str, name: str, cfg: BudgetConfig, now: float) -> BudgetScope:
    return BudgetScope(team, name, period_id(cfg.period, now), to_nano(cfg.usd), _PERIOD_TTL_S[cfg.period])
