"""Translation for the upstream: a request in a format its model's upstream does not speak (the Responses
API or Anthropic Messages to a Chat Completions server) is translated to chat once policies have chosen
the model and changed the request, before anything is reserved, so a request that cannot be translated is
refused in its own error shape having spent nothing. The dispatcher sends it; a fallback to an upstream
that speaks the format gets the request as it came."""

from __future__ import annotations

from proxy.config.models import PolicyFile
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.wire.formats import BY_ENDPOINT


class TranslateForUpstream(Step):
    """Translate the request to chat when the chosen model's upstream does not speak its format."""

    def __init__(self, policy: PolicyFile):
        self._models = policy.models

    async def on_request(self, ctx: RequestContext) -> None:
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        if wire.counts_only or wire.spoken_by(self._models[ctx.model]):
            return
        ctx.chat_body = wire.to_chat(ctx.body)
