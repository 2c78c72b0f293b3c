"""The policy engine: `policies:` evaluated in order; each whose `when:` matches applies its action.

Matchers are compiled once per policy file. A policy that acts is recorded on the request
(`x-llm-proxy-policies`, `llm_proxy_policy_applied_total`).
"""

from __future__ import annotations

import re
from fnmatch import translate

from proxy import metrics
from proxy.config.policies import PolicyConfig, WhenConfig
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import PolicyAction, Step
from proxy.services.budget_ledger import BudgetLedger
from proxy.services.estimator import Estimator
from proxy.services.evaluation import QualityFloor
from proxy.services.tasks import TaskClassifier
from proxy.wire.formats import BY_ENDPOINT


class _Matcher:
    def __init__(self, when: WhenConfig, tasks: TaskClassifier, ledger: BudgetLedger):
        self._when = when
        self._tasks = tasks
        self._ledger = ledger
        self._headers = {k.lower(): v for k, v in (when.headers or {}).items()}
        self._teams = frozenset(when.teams) if when.teams is not None else None
        self._endpoints = frozenset(when.endpoints) if when.endpoints is not None else None
        # All the model globs as one compiled regex: one match per request instead of one per glob.
        self._models = re.compile("|".join(f"(?:{translate(g)})" for g in when.models)) if when.models else None
        self._no_models = when.models is not None and not when.models
        # Only `task` (it may embed) and `budget_used_above` (it may read the store) need to wait.
        self.waits = when.task is not None or when.budget_used_above is not None

    async def matches(self, ctx: RequestContext) -> bool:
        return self.matches_now(ctx) and (not self.waits or await self.matches_later(ctx))

    def matches_now(self, ctx: RequestContext) -> bool:
        """The conditions that need no I/O."""
        w = self._when
        if self._teams is not None and ctx.team not in self._teams:
            return False
        if self._endpoints is not None and ctx.endpoint not in self._endpoints:
            return False
        if self._no_models or (self._models is not None and self._models.match(ctx.model) is None):
            return False
        if w.stream is not None and ctx.stream != w.stream:
            return False
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        if w.tools is not None and wire.offers_tools(ctx.body) != w.tools:
            return False
        if w.response_format is not None:
            asked = ctx.body.get("response_format") is not None or wire.wants_structured(ctx.body)
            if asked != w.response_format:
                return False
        if w.prompt_tokens is not None:
            lo, hi = w.prompt_tokens.min, w.prompt_tokens.max
            if (lo is not None and ctx.prompt_tokens < lo) or (hi is not None and ctx.prompt_tokens > hi):
                return False
        return all(ctx.headers.get(name) == value for name, value in self._headers.items())

    async def matches_later(self, ctx: RequestContext) -> bool:
        w = self._when
        if w.task is not None and not await self._tasks.matches(ctx, w.task):
            return False
        return not (
            w.budget_used_above is not None
            and await self._ledger.used_fraction(ctx.team, ctx.key_id) <= w.budget_used_above
        )


class ApplyPolicies(Step):
    """Evaluate `policies:` in order; each whose `when:` matches applies its action."""

    def __init__(
        self,
        rules: list[tuple[PolicyConfig, PolicyAction]],
        tasks: TaskClassifier,
        ledger: BudgetLedger,
        estimator: Estimator,
        floor: QualityFloor | None = None,
    ):
        self._rules = [(p.name, p.action, _Matcher(p.when, tasks, ledger), action) for p, action in rules]
        self._estimator = estimator
        # Policies below their quality floor are skipped: `stopped` only grows, until a reload.
        self._stopped = floor.stopped if floor is not None and floor.floors else None

    async def on_request(self, ctx: RequestContext) -> None:
        if not self._rules:
            return
        model, max_tokens = ctx.model, (ctx.body.get("max_tokens"), ctx.body.get("max_completion_tokens"))
        try:
            stopped = self._stopped
            for name, action_kind, matcher, action in self._rules:
                if stopped and name in stopped:
                    continue
                if not matcher.matches_now(ctx) or (matcher.waits and not await matcher.matches_later(ctx)):
                    continue
                try:
                    applied = await action.apply(ctx)
                finally:
                    if name in ctx.policies:  # an action that raises has recorded itself
                        metrics.child(metrics.POLICY_APPLIED, name, action_kind).inc()
                if applied:
                    ctx.policies.append(name)
                    metrics.child(metrics.POLICY_APPLIED, name, action_kind).inc()
                if ctx.answer is not None:
                    return
        finally:
            if ctx.model != model or max_tokens != (ctx.body.get("max_tokens"), ctx.body.get("max_completion_tokens")):
                self._estimator.reprice(ctx)
