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
from proxy.services.budget_ledger import BudgetLedger, budget_headers, seconds_until_reset
from proxy.services.estimator import Estimator
from proxy.store.base import NANO, BudgetScope, to_nano


class EnforceBudget(Step):
    """Reserve the worst case in every budget scope (or downgrade, if the budget says so); settle the real cost."""

    def __init__(self, ledger: BudgetLedger, estimator: Estimator, allowed: dict[str, frozenset[str]]):
        self._ledger = ledger
        self._store = ledger.store
        self._estimator = estimator
        self._allowed = allowed

    async def on_request(self, ctx: RequestContext) -> None:
        now = time.time()
        scopes = self._ledger.scopes(ctx.team, ctx.key_id, now, ctx.key_rights)
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
                failed, failed_cfg = scopes[result.failed if result else 0]
                used = result.used_nano[-1] if result else failed.limit_nano
                self._ledger.remember(failed, used)
                metrics.RATE_LIMITED.labels(ctx.team, "budget").inc()
                raise self._refusal(ctx, failed, failed_cfg, used, now)
        ctx.budget = BudgetSlot(plain, amount)
        for scope, used in zip(plain, result.used_nano, strict=True):
            self._ledger.remember(scope, used)
        # The scope with the least left is the one the client needs to know of.
        tightest = min(range(len(plain)), key=lambda i: plain[i].limit_nano - result.used_nano[i])
        headers = budget_headers(plain[tightest], scopes[tightest][1].period, result.used_nano[tightest], now)
        ctx.extra_headers += [(k.encode(), v.encode()) for k, v in headers.items()]

    @staticmethod
    def _refusal(ctx: RequestContext, scope: BudgetScope, cfg: BudgetConfig, used: int, now: float) -> BudgetExceeded:
        """The 429: how much the request could cost, the budget it does not fit, and when that resets
        (`Retry-After`). Retrying sooner helps only if requests in flight settle below what they reserved,
        so the SDKs are told not to retry on their own (`x-should-retry: false`)."""
        which = "your team's" if scope.name == "team" else "this key's"
        headers = budget_headers(scope, cfg.period, used, now)
        reset = seconds_until_reset(cfg.period, now)
        if reset is not None:
            headers["retry-after"] = str(reset)
            when = f"the budget resets in {reset} s (at the start of the next {cfg.period}, UTC)"
        else:
            when = "the budget has no period and does not reset"
        headers["x-should-retry"] = "false"
        period = "in total" if cfg.period == "none" else f"for this {cfg.period}"
        return BudgetExceeded(
            f"This request could cost up to ${ctx.cost_estimate:.6f}, which does not fit in {which} budget of "
            f"${scope.limit_nano / NANO:.2f} {period} (${max(0, scope.limit_nano - used) / NANO:.6f} left); "
            f"lower max_tokens or wait: {when}.",
            headers=headers,
        )

    def _can_downgrade(self, ctx: RequestContext, cfg: BudgetConfig) -> bool:
        return cfg.downgrade_to != ctx.model and ctx.may_use(cfg.downgrade_to, self._allowed)

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
