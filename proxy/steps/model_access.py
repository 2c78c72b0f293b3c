"""Model access: the model exists, the caller's team may use it, and it serves this endpoint."""

from __future__ import annotations

from proxy.config.models import PolicyFile
from proxy.errors import Forbidden, InvalidRequest, ModelNotFound
from proxy.pipeline.context import Endpoint, RequestContext
from proxy.pipeline.step import Step


class ResolveModel(Step):
    """The model exists, the team may use it, and it serves this endpoint (else 404, 403, 400)."""

    def __init__(self, policy: PolicyFile, allowed: dict[str, frozenset[str]]):
        self._models = policy.models
        self._allowed = allowed

    async def on_request(self, ctx: RequestContext) -> None:
        cfg = self._models.get(ctx.model)
        if cfg is None:
            raise ModelNotFound(
                f"The model '{ctx.model}' does not exist or is not served by this proxy.", param="model"
            )
        if ctx.model not in self._allowed.get(ctx.team, ()):
            raise Forbidden(f"Your key's team may not use the model '{ctx.model}'.", param="model")
        if not ctx.key_allows(ctx.model):
            raise Forbidden(f"Your key may not use the model '{ctx.model}'.", param="model")
        if (ctx.endpoint == Endpoint.EMBEDDINGS) != (cfg.mode == "embedding"):
            kind = "an embedding" if cfg.mode == "embedding" else f"a {cfg.mode}"
            raise InvalidRequest(
                f"The model '{ctx.model}' is {kind} model and does not serve this endpoint.",
                param="model",
                code="wrong_endpoint",
            )
