"""Token counting: before the call, the prompt's tokens, the worst-case output and the context-window
check; after it, the real usage (as the upstream reported it, or counted when it reported none)."""

from __future__ import annotations

from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.services.estimator import Estimator


class CountTokens(Step):
    """Count prompt tokens and price the worst case before the call; take the real usage after it."""

    def __init__(self, estimator: Estimator):
        self._estimator = estimator

    async def on_request(self, ctx: RequestContext) -> None:
        self._estimator.count_prompt(ctx)
        self._estimator.check_output_cap(ctx)
        self._estimator.reprice(ctx)
        ctx.counterfactual_estimate = ctx.cost_estimate

    async def on_response(self, ctx: RequestContext) -> None:
        ctx.usage = self._estimator.real_usage(ctx)
