"""Budgets per team and per key, in USD per period, that never overspend.

Before the call the worst case (prompt tokens × input price + max output tokens × output price) is
reserved atomically in every scope the request draws on; after it, the reservation is settled to
the real cost. N replicas sharing one store can never jointly spend past a budget.
"""

from __future__ import annotations

import time

from proxy import metrics
from proxy.config.models import BudgetConfig, PolicyFile
from proxy.errors import BudgetExceeded
from proxy.pipeline.context import RequestContext
from proxy.services.budget_ledger import scope_for
from proxy.store.base import NANO, BudgetScope, Store, to_nano


class EnforceBudget:
    def __init__(self, policy: PolicyFile, store: Store, reprice, allowed: dict[str, frozenset[str]]):
        self._teams = policy.teams
        self._store = store
        self._reprice = reprice
        self._allowed = allowed
        self._used_fraction: dict[str, tuple[str, float]] = {}  # team -> (period, last known fraction)
        # (team, key) -> (UTC day number, its scopes): periods change only at midnight UTC, so the
        # scopes (period ids from strftime, key names) are built once a day per key, not per request.
        self._scopes: dict[tuple[str | None, str | None], tuple[int, list[tuple[BudgetScope, BudgetConfig]]]] = {}

    def scopes(self, ctx: RequestContext, now: float) -> list[tuple[BudgetScope, BudgetConfig]]:
        day = int(now // 86400)
        cached = self._scopes.get((ctx.team, ctx.key_id))
        if cached is not None and cached[0] == day:
            return cached[1]
        cfg = self._teams.get(ctx.team)
        if cfg is None:
            return []
        out = []
        if cfg.budget is not None:
            out.append((scope_for(ctx.team, "team", cfg.budget, now), cfg.budget))
        if cfg.key_budget is not None:
            out.append((scope_for(ctx.team, f"key:{ctx.key_id}", cfg.key_budget, now), cfg.key_budget))
        if len(self._scopes) > 65536:  # keys are bounded by the config; this bounds a pathological one
            self._scopes.clear()
        self._scopes[(ctx.team, ctx.key_id)] = (day, out)
        return out

    async def used_fraction(self, ctx: RequestContext) -> float:
        """How much of the team's budget is spent or reserved (0..1): for `budget_used_above`."""
        scopes = self.scopes(ctx, time.time())
        if not scopes:
            return 0.0
        scope, _ = scopes[0]
        known = self._used_fraction.get(ctx.team)
        if known is not None and known[0] == scope.period:
            return known[1]
        (spent, reserved), *_ = await self._store.budget_usage([scope])
        return self._remember(scope, spent + reserved)

    def _remember(self, scope: BudgetScope, used_nano: int) -> float:
        fraction = min(1.0, used_nano / scope.limit_nano) if scope.limit_nano else 1.0
        if scope.name == "team":
            self._used_fraction[scope.team] = (scope.period, fraction)
            metrics.child(metrics.BUDGET_REMAINING, scope.team).set(max(0, scope.limit_nano - used_nano) / NANO)
        return fraction

    async def on_request(self, ctx: RequestContext) -> None:
        scopes = self.scopes(ctx, time.time())
        if not scopes or ctx.dry_run:
            return
        plain = [s for s, _ in scopes]
        amount = to_nano(ctx.cost_estimate)
        result = await self._store.reserve_budget(plain, amount)
        if result is None:  # store down, fail_open: settle will still journal the spend
            ctx.budget_scopes = plain
            return
        if not result.ok:
            scope, cfg = scopes[result.failed]
            if cfg.on_exceed == "downgrade" and self._can_downgrade(ctx, cfg):
                ctx.model = cfg.downgrade_to
                ctx.policies.append("budget-downgrade")
                ctx.routed_by.append("budget-downgrade")
                self._reprice(ctx)
                amount = to_nano(ctx.cost_estimate)
                result = await self._store.reserve_budget(plain, amount)
            if result is None or not result.ok:
                failed = scopes[result.failed if result else 0][0]
                self._remember(failed, result.used_nano[-1] if result else failed.limit_nano)
                metrics.RATE_LIMITED.labels(ctx.team, "budget").inc()
                which = "your team's" if failed.name == "team" else "this key's"
                raise BudgetExceeded(
                    f"This request could cost up to ${ctx.cost_estimate:.6f}, which does not fit in {which} "
                    f"budget of ${failed.limit_nano / NANO:.2f} for this {cfg.period}. Lower max_tokens or wait "
                    "for the next period."
                )
        ctx.budget_scopes = plain
        ctx.reserved_nano = amount
        for scope, used in zip(plain, result.used_nano, strict=True):
            self._remember(scope, used)

    def _can_downgrade(self, ctx: RequestContext, cfg: BudgetConfig) -> bool:
        return cfg.downgrade_to != ctx.model and cfg.downgrade_to in self._allowed.get(ctx.team, ())

    async def on_settle(self, ctx: RequestContext) -> None:
        if not ctx.budget_scopes:
            return
        actual = to_nano(ctx.cost)
        await self._store.settle_budget(ctx.budget_scopes, ctx.reserved_nano, actual)
        scope = ctx.budget_scopes[0]
        if scope.name == "team" and ctx.team in self._used_fraction:
            period, fraction = self._used_fraction[ctx.team]
            if period == scope.period:
                used = fraction * scope.limit_nano - ctx.reserved_nano + actual
                self._remember(scope, max(0, int(used)))
