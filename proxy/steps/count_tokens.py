"""Token counting before the call: prompt tokens, the worst-case output, and the context window check."""

from __future__ import annotations

from proxy.config.models import PolicyFile
from proxy.errors import ContextLengthExceeded
from proxy.pipeline.context import Endpoint, RequestContext
from proxy.services.pricing import PriceBook
from proxy.services.tokens import TokenCounter, counter_for


class CountTokens:
    def __init__(self, policy: PolicyFile, prices: PriceBook):
        self._prices = prices
        self._default_max_output = policy.server.default_max_output_tokens
        self._counters: dict[str, TokenCounter] = {
            name: counter_for(cfg.upstream_model or name, cfg.tokenizer) for name, cfg in policy.models.items()
        }

    def counter(self, model: str) -> TokenCounter:
        return self._counters[model]

    async def on_request(self, ctx: RequestContext) -> None:
        body = ctx.body
        counter = self._counters[ctx.model]
        price = self._prices.price(ctx.model)
        if ctx.endpoint == Endpoint.CHAT:
            n = counter.chat_prompt(body["messages"], body.get("tools"), body.get("functions"))
            param = "messages"
            prompts = 1
        else:
            param = "prompt" if ctx.endpoint == Endpoint.COMPLETIONS else "input"
            value = body[param]
            n = counter.prompt(value)
            prompts = len(value) if isinstance(value, list) and value and not isinstance(value[0], int) else 1
        if ctx.known_prompt_tokens is not None:
            n = ctx.known_prompt_tokens
        limit = price.max_input_tokens
        if limit and n > limit * prompts:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your request has {n} "
                f"prompt tokens. Please reduce the length of the {param}.",
                param=param,
            )
        ctx.prompt_tokens = n
        ctx.prompt_count = prompts
        self.reprice(ctx)
        ctx.counterfactual_estimate = ctx.cost_estimate

    def reprice(self, ctx: RequestContext) -> None:
        """Worst-case output and cost estimate for the request as it stands (after policies changed it)."""
        body = ctx.body
        price = self._prices.price(ctx.model)
        if ctx.endpoint == Endpoint.EMBEDDINGS:
            ctx.max_output_tokens = 0
        else:
            per_choice = (
                body.get("max_completion_tokens")
                or body.get("max_tokens")
                or price.max_output_tokens
                or self._default_max_output
            )
            ctx.max_output_tokens = per_choice * (body.get("n") or 1) * ctx.prompt_count
        ctx.cost_estimate = price.cost(ctx.prompt_tokens, ctx.max_output_tokens)
