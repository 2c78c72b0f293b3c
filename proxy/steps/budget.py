"""Budgets per team and per key, in USD per period, that never overspend.

Before the call the worst case (prompt tokens × input price + max output tokens × output price) is
reserved atomically in every scope the request draws on; after it, the reservation is settled to
the real cost, the embeddings made to decide the request included. N replicas sharing one store can
never jointly spend past a budget.
"""

from __future__ import annotations

import time

from proxy import metrics
from proxy.config.models import BudgetConfig
from proxy.errors import BudgetExceeded
from proxy.pipeline.context import BudgetSlot, RequestContext
from proxy.pipeline.step import Step
from proxy.services.budget_ledger import BudgetLedger
from proxy.services.estimator import Estimator
from proxy.store.base import NANO, to_nano


class EnforceBudget(Step):
    """Reserve the worst case in every budget scope (or downgrade, if the budget says so); settle the real cost."""

    def __init__(self, ledger: BudgetLedger, estimator: Estimator, allowed: dict[str, frozenset[str]]):
        self._ledger = ledger
        self._store = ledger.store
        self._estimator = estimator
        self._allowed = allowed

    async def on_request(self, ctx: RequestContext) -> None:
        scopes = self._ledger.scopes(ctx.team, ctx.key_id, time.time(), ctx.key_rights)
        if not scopes or ctx.dry_run:
            return
        plain = [s for s, _ in scopes]
        amount = to_nano(ctx.cost_estimate)
        result = await self._store.reserve_budget(plain, amount)
        if result is None:  # store down, fail_open: settle will still journal the spend
            ctx.budget = BudgetSlot(plain)
            return
        if not result.ok:
            scope, cfg = scopes[result.failed]
            if cfg.on_exceed == "downgrade" and self._can_downgrade(ctx, cfg):
                ctx.model = cfg.downgrade_to
                ctx.policies.append("budget-downgrade")
                ctx.routed_by.append("budget-downgrade")
                self._estimator.reprice(ctx)
                amount = to_nano(ctx.cost_estimate)
                result = await self._store.reserve_budget(plain, amount)
            if result is None or not result.ok:
                failed = scopes[result.failed if result else 0][0]
                self._ledger.remember(failed, result.used_nano[-1] if result else failed.limit_nano)
                metrics.RATE_LIMITED.labels(ctx.team, "budget").inc()
                which = "your team's" if failed.name == "team" else "this key's"
                raise BudgetExceeded(
                    f"This request could cost up to ${ctx.cost_estimate:.6f}, which does not fit in {which} "
                    f"budget of ${failed.limit_nano / NANO:.2f} for this {cfg.period}. Lower max_tokens or wait "
                    "for the next period."
                )
        ctx.budget = BudgetSlot(plain, amount)
        for scope, used in zip(plain, result.used_nano, strict=True):
            self._ledger.remember(scope, used)

    def _can_downgrade(self, ctx: RequestContext, cfg: BudgetConfig) -> bool:
        return cfg.downgrade_to != ctx.model and cfg.downgrade_to in self._allowed.get(ctx.team, ())

    async def on_settle(self, ctx: RequestContext) -> None:
        slot = ctx.budget
        if slot is not None:
            actual = to_nano(ctx.cost)
            await self._store.settle_budget(slot.scopes, slot.reserved_nano, actual)
            self._ledger.settled(slot.scopes[0], slot.reserved_nano, actual)
        # Embeddings made to decide the request (a retrieval lookup, a task match) are spent whatever the
        # outcome, reserved or not (a retrieval hit reserves nothing: they are all it cost).
        if ctx.embeddings is not None and ctx.team is not None and not ctx.dry_run:
            spent = to_nano(ctx.embeddings.cost())
            if spent > 0:
                scopes = (
                    slot.scopes
                    if slot is not None
                    else [s for s, _ in self._ledger.scopes(ctx.team, ctx.key_id, time.time(), ctx.key_rights)]
                )
                if scopes:
                    await self._store.settle_budget(scopes, 0, spent)
