"""`GET /admin/savings`: real spend, saved USD and the counterfactual, per policy, team, model and day,
and the realised saving of every conciseness policy measured against its hold-out arm."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from proxy.config.models import PolicyFile
from proxy.services.holdout_stats import HOLDOUT, TREATED, ArmStats, realised_saving
from proxy.store.base import NANO, Store, utc_day


def _money(spend_nano: int, saved_nano: int, requests: int) -> dict[str, Any]:
    return {
        "requests": requests,
        "spend_usd": spend_nano / NANO,
        "saved_usd": saved_nano / NANO,
        "counterfactual_usd": (spend_nano + saved_nano) / NANO,
    }


async def conciseness(policy: PolicyFile, store: Store) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in policy.policies:
        if p.concise is None:
            continue
        stats = await store.arm_stats(p.name)
        per_model: dict[str, Any] = {}
        for model in sorted({m for m, _ in stats}):
            treated = ArmStats(*stats.get((model, TREATED), (0, 0, 0)))
            holdout = ArmStats(*stats.get((model, HOLDOUT), (0, 0, 0)))
            estimate = realised_saving(treated, holdout)
            entry: dict[str, Any] = (
                estimate.as_dict()
                if estimate
                else {"saving": None, "ci95": None, "treated": {"n": treated.n}, "holdout": {"n": holdout.n}}
            )
            entry["used_for_savings"] = min(treated.n, holdout.n) >= p.concise.min_samples
            per_model[model] = entry
        out[p.name] = {"holdout": p.concise.holdout, "min_samples": p.concise.min_samples, "by_model": per_model}
    return out


async def savings_report(policy: PolicyFile, store: Store, days: int) -> dict[str, Any]:
    now = time.time()
    day_list = [utc_day(now - 86400 * i) for i in range(days)]
    teams = sorted(policy.teams)
    spend = await store.spend(teams, day_list)
    totals = [0, 0, 0]  # spend, saved, requests
    by_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    by_policy: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_day: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    by_team: dict[str, Any] = {}
    for team, ts in spend.items():
        t_spend = sum(line.cost_nano for line in ts.total.values())
        t_saved = sum(line.saved_nano for line in ts.total.values())
        t_requests = sum(line.requests for line in ts.total.values())
        by_team[team] = {
            **_money(t_spend, t_saved, t_requests),
            "by_policy": {p: line.as_dict() for p, line in sorted(ts.policies.items())},
            "by_model": {m: line.as_dict() for m, line in sorted(ts.total.items())},
        }
        totals[0] += t_spend
        totals[1] += t_saved
        totals[2] += t_requests
        for model, line in ts.total.items():
            row = by_model[model]
            row[0] += line.cost_nano
            row[1] += line.saved_nano
            row[2] += line.requests
        for name, pl in ts.policies.items():
            by_policy[name][0] += pl.requests
            by_policy[name][1] += pl.saved_nano
        for day, lines in ts.by_day.items():
            row = by_day[day]
            row[0] += sum(line.cost_nano for line in lines.values())
            row[1] += sum(line.saved_nano for line in lines.values())
            row[2] += sum(line.requests for line in lines.values())
    return {
        "period": {"days": days, "from": day_list[-1], "to": day_list[0]},
        "totals": _money(*totals),
        "by_policy": {p: {"requests": r, "saved_usd": n / NANO} for p, (r, n) in sorted(by_policy.items())},
        "by_team": by_team,
        "by_model": {m: _money(*row) for m, row in sorted(by_model.items())},
        "by_day": {d: _money(*row) for d, row in sorted(by_day.items())},
        "conciseness": await conciseness(policy, store),
    }
