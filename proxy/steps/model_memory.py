"""A request to a self-hosted model must fit its GPU memory: one whose prompt plus max output tokens can
never fit what the weights leave gets a 400 here, before any budget is reserved or spent."""

from __future__ import annotations

from proxy.config.capacity import ModelMemory
from proxy.config.models import PolicyFile
from proxy.errors import ExceedsModelMemory
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step


class FitModelMemory(Step):
    """A request to a self-hosted model fits its GPU memory (else 400, before any reservation)."""

    def __init__(self, policy: PolicyFile):
        self.memory: dict[str, ModelMemory] = {
            name: memory for name, cfg in policy.models.items() if (memory := ModelMemory.of(cfg)) is not None
        }

    async def on_request(self, ctx: RequestContext) -> None:
        memory = self.memory.get(ctx.model or "")
        if memory is None:
            return
        why = memory.misfit(ctx.model, ctx.prompt_tokens + ctx.max_output_tokens)
        if why is not None:
            raise ExceedsModelMemory(why, param="max_tokens")
