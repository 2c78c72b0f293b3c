"""The `route` action: send the request to a cheaper model when the price book says it is worth it.

`min_cost_multiple: N` routes only when the requested model costs at least N times the target for
this very request (its prompt tokens and expected output, priced from the price book: the founding
"GPT-4 ≈ 50× GPT-3.5" is read off the prices, never hard-coded). `on_budget_pressure` picks the
target by how much of the team's budget is used. `learned:` routes to `to` only where a learned router
predicts the cheap model's answer is good enough for this prompt. The saving is settled from real usage later.
"""

from __future__ import annotations

from proxy.config.policies import RouteAction
from proxy.pipeline.context import RequestContext
from proxy.pipeline.deps import ActionDeps
from proxy.pipeline.step import PolicyAction


class Route(PolicyAction):
    """Send the request to a cheaper model when the price book says it is worth it."""

    def __init__(self, cfg: RouteAction, name: str, deps: ActionDeps):
        self._cfg = cfg
        self._name = name
        self._prices = deps.prices
        self._allowed = deps.allowed
        self._ledger = deps.ledger
        self._pressure = sorted(cfg.on_budget_pressure, key=lambda s: s.above, reverse=True)
        self._router = deps.routers.get(name) if cfg.learned is not None else None

    async def _target(self, ctx: RequestContext) -> str | None:
        if self._pressure:
            used = await self._ledger.used_fraction(ctx.team, ctx.key_id)
            for step in self._pressure:
                if used > step.above:
                    return step.to
        return self._cfg.to

    async def apply(self, ctx: RequestContext) -> bool:
        target = await self._target(ctx)
        if target is None or ctx.model == target or not ctx.may_use(target, self._allowed):
            return False
        if self._cfg.min_cost_multiple is not None:
            expected_output = min(ctx.max_output_tokens, self._cfg.expected_output_tokens)
            multiple = self._prices.cost_multiple(ctx.model, target, ctx.prompt_tokens, expected_output)
            if multiple < self._cfg.min_cost_multiple:
                return False
        if self._cfg.learned is not None and target == self._cfg.to and not await self._predicts_cheap_ok(ctx):
            return False
        ctx.model = target
        ctx.routed_by.append(self._name)
        if self._cfg.fallback_to_requested:
            ctx.fallback_to_requested = True
        return True

    async def _predicts_cheap_ok(self, ctx: RequestContext) -> bool:
        """The learned router's say, last because it embeds the prompt; no router or no prediction: keep."""
        if self._router is None:
            return False
        prediction = await self._router.predict(ctx, ctx.user_text())
        if prediction is None:
            return False
        if ctx.router_predictions is None:
            ctx.router_predictions = {}
        ctx.router_predictions[self._name] = prediction.as_json()
        return prediction.routes
