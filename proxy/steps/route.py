"""The `route` action: send the request to another model, optionally only when the requested model
costs at least `min_cost_multiple` times the target for this very request (from the price book)."""

from __future__ import annotations

from proxy.config.policies import RouteAction
from proxy.pipeline import RequestContext


class Route:
    def __init__(self, cfg: RouteAction, name: str, deps):
        self._to = cfg.to
        self._name = name
        self._min_multiple = cfg.min_cost_multiple
        self._expected_output = cfg.expected_output_tokens
        self._prices = deps.prices
        self._allowed = deps.allowed

    async def apply(self, ctx: RequestContext) -> bool:
        if ctx.model == self._to or self._to not in self._allowed.get(ctx.team, ()):
            return False
        if self._min_multiple is not None:
            expected_output = min(ctx.max_output_tokens, self._expected_output)
            multiple = self._prices.cost_multiple(ctx.model, self._to, ctx.prompt_tokens, expected_output)
            if multiple < self._min_multiple:
                return False
        ctx.model = self._to
        ctx.saved_by_policy[self._name] = 0.0  # settled from real usage once the answer is in
        return True
