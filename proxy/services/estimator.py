"""The estimator: token counts and prices of a request, before the call (the worst case a budget
reserves) and after it (the real usage, counted the upstream's way when it reported none)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.config.models import PolicyFile
from proxy.errors import ContextLengthExceeded, InvalidRequest
from proxy.services.pricing import PriceBook
from proxy.services.tokens import TokenCounter, counter_for
from proxy.wire.adapter import Endpoint
from proxy.wire.formats import BY_ENDPOINT
from proxy.wire.usage import TokenUsage, counted_usage, usage_from

if TYPE_CHECKING:
    from proxy.pipeline.context import RequestContext


class Estimator:
    def __init__(self, policy: PolicyFile, prices: PriceBook, allowed: Mapping[str, frozenset[str]] | None = None):
        self.prices = prices
        self._allowed = allowed
        self._default_max_output = policy.server.default_max_output_tokens
        self._counters: dict[str, TokenCounter] = {
            name: counter_for(cfg.upstream_model or name, cfg.tokenizer) for name, cfg in policy.models.items()
        }
        self._window_fallbacks = {name: cfg.context_window_fallbacks for name, cfg in policy.models.items()}

    def _may_use(self, ctx: RequestContext, model: str) -> bool:
        """A fallback the request's team (where its models are known) and runtime key may both use."""
        if self._allowed is None or ctx.team is None:
            return ctx.key_allows(model)
        return ctx.may_use(model, self._allowed)

    def counter(self, model: str) -> TokenCounter:
        return self._counters[model]

    def _prompt_tokens(self, ctx: RequestContext, model: str) -> tuple[int, int]:
        n, prompts = (ctx.wire or BY_ENDPOINT[ctx.endpoint]).count_prompt(self._counters[model], ctx.body)
        return (n if ctx.known_prompt_tokens is None else ctx.known_prompt_tokens), prompts

    def _fits(self, model: str, n: int, prompts: int) -> bool:
        limit = self.prices.price(model).max_input_tokens
        return not limit or n <= limit * prompts

    def count_prompt(self, ctx: RequestContext) -> None:
        """Prompt tokens of the request for its model, checked against the model's context window; a
        prompt too long for it goes to the first of its `context_window_fallbacks` whose window fits."""
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        n, prompts = self._prompt_tokens(ctx, ctx.model)
        if not self._fits(ctx.model, n, prompts):
            usable = [m for m in self._window_fallbacks[ctx.model] if self._may_use(ctx, m)]
            for fallback in usable:
                fb_n, fb_prompts = self._prompt_tokens(ctx, fallback)  # its own tokenizer may count otherwise
                if self._fits(fallback, fb_n, fb_prompts):
                    ctx.model = fallback
                    ctx.policies.append("context-window-fallback")
                    n, prompts = fb_n, fb_prompts
                    break
            else:
                limit = self.prices.price(ctx.model).max_input_tokens
                windows = [self.prices.price(f).max_input_tokens or 0 for f in usable]
                widest = f" ({max(windows)} with its context-window fallbacks)" if windows else ""
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens{widest}. However, your request has "
                    f"{n} prompt tokens. Please reduce the length of the {wire.prompt_param}.",
                    param=wire.prompt_param,
                )
        ctx.prompt_tokens = n
        ctx.prompt_count = prompts

    def check_output_cap(self, ctx: RequestContext) -> None:
        """`max_tokens` / `max_completion_tokens` within the model's output cap (400 otherwise, as OpenAI
        answers): before any reservation, so an impossible request never looks like a budget problem."""
        cap = self.prices.price(ctx.model).max_output_tokens
        if not cap or ctx.endpoint == Endpoint.EMBEDDINGS:
            return
        for name in ("max_completion_tokens", "max_tokens"):
            asked = ctx.body.get(name)
            if isinstance(asked, int) and asked > cap:
                raise InvalidRequest(
                    f"{name} is too large: {asked}. This model supports at most {cap} completion tokens, "
                    f"whereas you provided {asked}.",
                    param=name,
                    code="invalid_value",
                )

    def reprice(self, ctx: RequestContext) -> None:
        """Worst-case output and cost estimate for the request as it stands (after policies changed it)."""
        body = ctx.body
        price = self.prices.price(ctx.model)
        if ctx.endpoint == Endpoint.EMBEDDINGS:
            ctx.max_output_tokens = 0
        else:
            wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
            cap = price.max_output_tokens
            per_choice = wire.max_output(body) or cap or self._default_max_output
            if cap:  # a model routed to after the check cannot generate more than its cap either
                per_choice = min(per_choice, cap)
            ctx.max_output_tokens = per_choice * (body.get("n") or 1) * ctx.prompt_count
        # A prompt that marks `cache_control` may be written to the cache whole, at the dearer write price.
        ctx.cost_estimate = price.worst_case_cost(
            ctx.prompt_tokens, ctx.max_output_tokens, cache_writes=b'"cache_control"' in ctx.raw
        )

    def real_usage(self, ctx: RequestContext) -> TokenUsage:
        """The usage of what answered the request: the upstream's report, else counted by the answering
        model's tokenizer (the prompt as counted before the call, the output from the generated text)."""
        reply = ctx.reply
        if reply is None:  # answered by a step (retrieval): its answer carries its own usage
            answer = ctx.answer or {}
            return usage_from(answer.get("usage")) or TokenUsage()
        if reply.usage is not None:
            return reply.usage
        if ctx.endpoint == Endpoint.EMBEDDINGS:
            return counted_usage(ctx.prompt_tokens, 0)
        counter = self._counters[ctx.answered_by or ctx.model]
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        text = wire.stream_text(reply.events) if reply.events is not None else wire.reply_text(reply.data or {})
        return counted_usage(ctx.prompt_tokens, counter.text(text))

    def cost(self, model: str, usage: TokenUsage) -> float:
        """Exact: cache reads, cache writes and reasoning tokens at their own prices, tiers by prompt length."""
        return self.prices.cost(model, usage)

    def embedding_tokens(self, model: str, texts: list[str], reported: Any) -> int:
        """Input tokens of an embedding call: as reported, else counted."""
        usage = usage_from(reported)
        if usage is not None:
            return usage.input
        counter = self._counters.get(model) or counter_for(model, None)
        return sum(counter.text(t) for t in texts)
