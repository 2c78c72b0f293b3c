"""Accounting: price the real usage once the upstream has answered, then record spend and metrics.

`on_response` runs before the response headers go out (non-stream) or at the end of a stream;
`on_settle` runs after the client has its answer, so recording never delays it.
"""

from __future__ import annotations

import logging

from proxy import metrics
from proxy.config.models import PolicyFile
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.services.estimator import Estimator
from proxy.store.base import Store, StoreUnavailable, Usage, to_nano, utc_day
from proxy.wire.usage import TokenUsage

log = logging.getLogger("llm_proxy.accounting")

_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class RecordUsage(Step):
    """Price the real usage; record spend, tokens and savings (the request's embeddings included)."""

    def __init__(self, policy: PolicyFile, estimator: Estimator, store: Store):
        self._models = policy.models
        self._estimator = estimator
        self._prices = estimator.prices
        self._store = store

    async def on_response(self, ctx: RequestContext) -> None:
        """Real cost from usage; the saving of each policy against the counterfactual (no policy).

        Routing saves the price difference on the tokens really used; other policies (conciseness,
        retrieval) have put their own saving in `saved_by_policy` already. The counterfactual is
        cost + saved, so both reconcile with usage exactly.
        """
        model = ctx.answered_by or ctx.model
        ctx.cost = self._estimator.cost(model, ctx.usage) if ctx.usage is not None else 0.0
        requested = ctx.model_requested
        if ctx.routed_by and requested in self._models and requested != model and ctx.route != "retrieval":
            saving = max(0.0, self._prices.cost(requested, ctx.usage or TokenUsage()) - ctx.cost)
            for policy in ctx.routed_by:
                ctx.saved_by_policy[policy] = saving / len(ctx.routed_by)
        ctx.saved = sum(ctx.saved_by_policy.values())

    async def on_settle(self, ctx: RequestContext) -> None:
        team = ctx.team or "unauthenticated"
        requested = ctx.model_requested if ctx.model_requested in self._models else "unknown"
        metrics.child(metrics.REQUESTS, team, requested, ctx.route, _STATUS_CLASS.get(ctx.status // 100, "5xx")).inc()
        metrics.child(metrics.OPERATION_DURATION, requested, ctx.route).observe(ctx.elapsed())
        metrics.child(metrics.OVERHEAD, ctx.route).observe(ctx.overhead())
        if ctx.team is None:
            return
        if ctx.embeddings is not None and ctx.route != "retrieval":
            await self._record_embeddings(ctx, team)  # a hit's cost is the embedding: recorded below
        used = ctx.usage
        input_tokens, output_tokens = (used.input, used.output) if used is not None else (0, 0)
        if not (input_tokens or output_tokens or ctx.saved):
            return
        model = ctx.answered_by or ctx.model
        source = "counted" if used is not None and used.counted else "reported"
        metrics.child(metrics.TOKENS, team, model, "input", source).inc(input_tokens)
        metrics.child(metrics.TOKENS, team, model, "output", source).inc(output_tokens)
        if used is not None:  # of those, the kinds priced apart (cache reads and writes, reasoning)
            for kind, count in (
                ("cached_input", used.cached_input),
                ("cache_write", used.cache_write),
                ("reasoning", used.reasoning),
            ):
                if count:
                    metrics.child(metrics.TOKENS, team, model, kind, source).inc(count)
        metrics.child(metrics.TOKEN_USAGE, model, "input").observe(input_tokens)
        if output_tokens:
            metrics.child(metrics.TOKEN_USAGE, model, "output").observe(output_tokens)
        metrics.child(metrics.SPEND, team, model).inc(ctx.cost)
        for policy, saved in ctx.saved_by_policy.items():
            if saved > 0:
                metrics.child(metrics.SAVED, team, requested, policy).inc(saved)
        usage = Usage(
            team,
            model,
            to_nano(ctx.cost),
            input_tokens,
            output_tokens,
            to_nano(ctx.saved),
            tuple((p, to_nano(v)) for p, v in ctx.saved_by_policy.items()),
        )
        try:
            await self._store.record_usage(usage, utc_day())
        except StoreUnavailable as e:
            log.error("could not record spend for team %s: %s", team, e)

    async def _record_embeddings(self, ctx: RequestContext, team: str) -> None:
        """The embeddings made to decide the request, as spend of their embedding models."""
        for call in ctx.embeddings.calls:
            if call.embedder == "local" and not call.cost:
                continue
            source = "counted" if call.counted else "reported"
            metrics.TOKENS.labels(team, call.embedder, "input", source).inc(call.tokens)
            metrics.SPEND.labels(team, call.embedder).inc(call.cost)
            try:
                await self._store.record_usage(
                    Usage(team, call.embedder, to_nano(call.cost), call.tokens, 0), utc_day()
                )
            except StoreUnavailable as e:
                log.error("could not record embedding spend for team %s: %s", team, e)
