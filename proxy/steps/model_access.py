"""Model access: the model exists, the caller's team may use it, and it serves this endpoint."""

from __future__ import annotations

from fnmatch import fnmatchcase

from proxy.config.models import PolicyFile
from proxy.errors import Forbidden, InvalidRequest, ModelNotFound
from proxy.pipeline.context import Endpoint, RequestContext


def allowed_models(policy: PolicyFile) -> dict[str, frozenset[str]]:
    """Team → the configured model names its `models:` globs admit."""
    return {
        team: frozenset(m for m in policy.models if any(fnmatchcase(m, pattern) for pattern in cfg.models))
        for team, cfg in policy.teams.items()
    }


class ResolveModel:
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
        if (ctx.endpoint == Endpoint.EMBEDDINGS) != (cfg.mode == "embedding"):
            kind = "an embedding" if cfg.mode == "embedding" else f"a {cfg.mode}"
            raise InvalidRequest(
                f"The model '{ctx.model}' is {kind} model and does not serve this endpoint.",
                param="model",
                code="wrong_endpoint",
            )
