"""The `concise` action: ask for shorter answers ("Be concise." saves 40–90% of output tokens) and
measure what it really saves with a hold-out arm.

A deterministic fraction of requests (by a hash of the request id) is left untouched; output tokens
of both arms are recorded per policy and model. Once both arms have `min_samples`, the realised
saving (treated vs hold-out mean, with its confidence interval) prices the saved USD of treated
requests: the output tokens they would have used, at the requested model's output price.
"""

from __future__ import annotations

import time

from proxy import metrics
from proxy.config.policies import ConciseAction
from proxy.pipeline.context import RequestContext
from proxy.pipeline.deps import ActionDeps
from proxy.pipeline.step import PolicyAction
from proxy.services.holdout_stats import HOLDOUT, TREATED, ArmStats, SavingEstimate, holdout_bucket, realised_saving
from proxy.wire.formats import BY_ENDPOINT

_STATS_TTL_S = 5.0
# Until both arms have enough samples, look again sooner: the first estimate should not wait long.
_NO_ESTIMATE_TTL_S = 1.0
_MESSAGE_FRAMING_TOKENS = 4


class Concise(PolicyAction):
    """Inject the conciseness instruction (or hold the request out); measure the saving of both arms."""

    def __init__(self, cfg: ConciseAction, name: str, deps: ActionDeps):
        self.cfg = cfg
        self.name = name
        self._prices = deps.prices
        self._store = deps.store
        self._estimator = deps.estimator
        self._opt_out = cfg.opt_out_header.lower() if cfg.opt_out_header else None
        self._estimates: dict[str, tuple[float, SavingEstimate | None]] = {}
        self._instruction_tokens: dict[str, int] = {}  # model -> tokens the instruction adds (counted once)

    def _skip(self, ctx: RequestContext) -> bool:
        body, wire = ctx.body, ctx.wire or BY_ENDPOINT[ctx.endpoint]
        if not wire.conversational:
            return True
        if self.cfg.skip_json and wire.wants_structured(body):
            return True
        if self.cfg.skip_tools and wire.offers_tools(body):
            return True
        return bool(self._opt_out and ctx.headers.get(self._opt_out))

    async def apply(self, ctx: RequestContext) -> bool:
        if self._skip(ctx):
            return False
        if holdout_bucket(ctx.request_id) < self.cfg.holdout:
            ctx.experiments[self.name] = HOLDOUT
            ctx.extra_headers.append((b"x-llm-proxy-holdout", self.name.encode()))
            return True
        ctx.experiments[self.name] = TREATED
        if self._inject(ctx):
            added = self._instruction_tokens.get(ctx.model)
            if added is None:
                added = self._estimator.counter(ctx.model).text(self.cfg.instruction) + _MESSAGE_FRAMING_TOKENS
                self._instruction_tokens[ctx.model] = added
            ctx.prompt_tokens += added
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        if self.cfg.max_tokens and not wire.max_output(ctx.body):
            wire.limit_output(ctx.body, self.cfg.max_tokens)
        return True

    def _inject(self, ctx: RequestContext) -> bool:
        """Add the instruction once, in its place (the format's: a system message, `instructions`,
        Anthropic's `system`); False when it is already there."""
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        return wire.add_instruction(ctx.body, self.cfg.instruction, self.cfg.placement)

    async def estimate(self, model: str) -> SavingEstimate | None:
        """The realised saving for `model`, refreshed from the store at most every few seconds."""
        now = time.monotonic()
        cached = self._estimates.get(model)
        if cached is not None and cached[0] > now:
            return cached[1]
        stats = await self._store.arm_stats(self.name)
        estimate = None
        treated, holdout = stats.get((model, TREATED)), stats.get((model, HOLDOUT))
        if treated and holdout and min(treated[0], holdout[0]) >= self.cfg.min_samples:
            estimate = realised_saving(ArmStats(*treated), ArmStats(*holdout))
        self._estimates[model] = (now + (_STATS_TTL_S if estimate else _NO_ESTIMATE_TTL_S), estimate)
        return estimate

    async def on_response(self, ctx: RequestContext) -> None:
        if ctx.experiments.get(self.name) != TREATED or ctx.error is not None or not ctx.output_tokens:
            return
        estimate = await self.estimate(ctx.answered_by or ctx.model)
        if estimate is None or estimate.ratio <= 0 or estimate.saving <= 0:
            return
        extra_tokens = ctx.output_tokens / estimate.ratio - ctx.output_tokens
        requested = ctx.model_requested if self._prices.is_known(ctx.model_requested) else ctx.model
        ctx.saved_by_policy[self.name] = extra_tokens * self._prices.price(requested).output_per_token

    async def on_settle(self, ctx: RequestContext) -> None:
        arm = ctx.experiments.get(self.name)
        if arm is None or ctx.error is not None or ctx.cancelled or not ctx.output_tokens:
            return
        model = ctx.answered_by or ctx.model
        metrics.child(metrics.CONCISE_OUTPUT_TOKENS, self.name, model, arm).observe(ctx.output_tokens)
        await self._store.record_arm(self.name, model, arm, ctx.output_tokens)
