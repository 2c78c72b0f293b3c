"""`GET /admin/savings`: real spend, saved USD and the counterfactual, per policy, team, model and day,
the realised saving of every conciseness policy measured against its hold-out arm, and beside each
shadowed policy's saving the quality it keeps (judged pairs, quality retained with its Wilson 95%
interval, its floor) with the measurement spend that bought the figure."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from proxy.config.evaluation import MEASUREMENT_TEAM
from proxy.config.models import PolicyFile
from proxy.services.evaluation import ShadowEvaluator
from proxy.services.holdout_stats import HOLDOUT, TREATED, ArmStats, realised_saving
from proxy.services.quality import quality_retained
from proxy.store.base import NANO, JudgementCounts, Store, utc_day


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


def _quality(counts: JudgementCounts) -> dict[str, Any]:
    q = quality_retained(counts.win, counts.tie, counts.loss)
    return {
        "judged": q.n,
        "wins": counts.win,
        "ties": counts.tie,
        "losses": counts.loss,
        "unjudged": counts.unjudged,
        "quality_retained": q.share if q.n else None,
        "ci95": [q.low, q.high],
    }


async def shadow_quality(
    policy: PolicyFile, store: Store, evaluator: ShadowEvaluator | None, day_list: list[str]
) -> dict[str, Any]:
    """Per shadowed policy: its judged pairs over the period, by model pair and day, and its floor."""
    shadowed = [p for p in policy.policies if p.shadow is not None]
    if not shadowed:
        return {}
    rows = await store.judgements([p.name for p in shadowed], day_list)
    out: dict[str, Any] = {}
    for p in shadowed:
        total, by_pair, by_day = JudgementCounts(), defaultdict(JudgementCounts), defaultdict(JudgementCounts)
        for (day, pair), counts in rows.get(p.name, {}).items():
            total.add(counts)
            by_pair[pair].add(counts)
            by_day[day].add(counts)
        entry = {
            **_quality(total),
            "compare": p.shadow.compare,
            "rate": p.shadow.rate,
            "by_model_pair": {k: _quality(v) for k, v in sorted(by_pair.items())},
            "by_day": {k: _quality(v) for k, v in sorted(by_day.items())},
        }
        if p.min_quality is not None:
            stopped = evaluator.floor.stopped.get(p.name) if evaluator is not None else None
            entry["floor"] = {
                "min_quality": p.min_quality,
                "min_samples": p.min_samples,
                "stopped": stopped is not None,
                # what the floor read when it stopped the policy (over its window of days)
                "stopped_at": (
                    {"quality_retained": stopped.share, "ci95": [stopped.low, stopped.high], "judged": stopped.n}
                    if stopped is not None
                    else None
                ),
            }
        out[p.name] = entry
    return out


async def measurement(
    policy: PolicyFile, store: Store, evaluator: ShadowEvaluator | None, day_list: list[str]
) -> dict[str, Any] | None:
    """What shadow and judge calls cost (never a team's spend), and today's measurement budget."""
    if policy.evaluation is None:
        return None
    ms = (await store.spend([MEASUREMENT_TEAM], day_list))[MEASUREMENT_TEAM]
    out: dict[str, Any] = {
        "spend_usd": sum(line.cost_nano for line in ms.total.values()) / NANO,
        "by_model": {m: line.as_dict() for m, line in sorted(ms.total.items())},
        "by_day": {d: sum(line.cost_nano for line in lines.values()) / NANO for d, lines in sorted(ms.by_day.items())},
        "budget_usd_per_day": policy.evaluation.budget_usd_per_day,
    }
    if evaluator is not None:
        scope = evaluator.budget_scope()
        ((spent, reserved),) = await store.budget_usage([scope])
        out["today"] = {
            "period": scope.period,
            "spent_usd": spent / NANO,
            "reserved_usd": reserved / NANO,
            "remaining_usd": max(0, scope.limit_nano - spent - reserved) / NANO,
        }
        out["queued"] = evaluator.waiting
    return out


async def savings_report(
    policy: PolicyFile, store: Store, days: int, evaluator: ShadowEvaluator | None = None
) -> dict[str, Any]:
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
    policies: dict[str, Any] = {p: {"requests": r, "saved_usd": n / NANO} for p, (r, n) in by_policy.items()}
    for name, quality in (await shadow_quality(policy, store, evaluator, day_list)).items():
        policies.setdefault(name, {"requests": 0, "saved_usd": 0.0})["quality"] = quality
    return {
        "period": {"days": days, "from": day_list[-1], "to": day_list[0]},
        "totals": _money(*totals),
        "by_policy": dict(sorted(policies.items())),
        "by_team": by_team,
        "by_model": {m: _money(*row) for m, row in sorted(by_model.items())},
        "by_day": {d: _money(*row) for d, row in sorted(by_day.items())},
        "conciseness": await conciseness(policy, store),
        "measurement": await measurement(policy, store, evaluator, day_list),
    }
