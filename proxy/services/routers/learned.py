"""A learned router at run time, built once per runtime for a `route.learned` policy: it embeds the
request's user text through the runtime's embedder (shared with every other step that embeds it) and
predicts the probability that the cheap model's answer is at least as good as the requested model's.

No prediction (embedder down, no text, an embedder other than the router's) keeps the requested model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from proxy import metrics
from proxy.config.loader import ConfigError, ConfigIssue
from proxy.config.models import PolicyFile
from proxy.config.router_file import RouterFile, RouterFileError, read_router_file
from proxy.retrieval.embedders import Embedder, EmbedderDown, EmbeddingHolder, embed_for_request
from proxy.services.routers.features import CHEAP_FEATURES, cheap_features

log = logging.getLogger("llm_proxy.router")


@dataclass(frozen=True, slots=True)
class RouterPrediction:
    p_cheap_ok: float  # P(the cheap model's answer is at least as good)
    threshold: float | None  # None: this target quality never routes
    routes: bool

    def as_json(self) -> dict[str, object]:
        return {"p_cheap_ok": round(self.p_cheap_ok, 4), "threshold": self.threshold, "routes": self.routes}


class LearnedRouter:
    def __init__(self, file: RouterFile, embedder: Embedder, policy: str, target_quality: float | None = None):
        if tuple(file.features) != CHEAP_FEATURES:
            raise RouterFileError(
                f"router file {file.path} uses features {list(file.features)}; this proxy computes "
                f"{list(CHEAP_FEATURES)}: fit it again"
            )
        self.file = file
        self.policy = policy
        self.target_quality = target_quality if target_quality is not None else file.target_quality
        self.expected = file.threshold_for(self.target_quality)  # held-out strong share and quality
        self.threshold = self.expected.threshold
        self._embedder = embedder
        self._weights = np.asarray(file.weights)
        self._mean = np.asarray(file.mean)
        self._scale = np.asarray(file.scale)
        self._warned = False

    def score(self, vector: np.ndarray, text: str) -> float:
        x = np.concatenate([np.asarray(vector, dtype=np.float64), cheap_features(text)])
        z = float(((x - self._mean) / self._scale) @ self._weights + self.file.bias)
        return 0.5 * (1.0 + float(np.tanh(0.5 * z)))

    async def predict(self, ctx: EmbeddingHolder, text: str) -> RouterPrediction | None:
        """The prediction for a request's user text; its embedding is kept on the request for other steps."""
        if not text.strip():
            return self._unavailable()
        try:
            vector = await embed_for_request(ctx, self._embedder, text)
        except EmbedderDown as e:
            log.debug("policy %s: router has no embedding: %s", self.policy, e)
            return self._unavailable()
        if self._embedder.identity != self.file.embedder:
            if not self._warned:  # once per runtime: the file is wrong until the next reload
                self._warned = True
                log.error(
                    "policy %s: router %s was fitted on embedder %s, the configured one is %s: not routing",
                    self.policy,
                    self.file.path,
                    self.file.embedder,
                    self._embedder.identity,
                )
            return self._unavailable()
        p = self.score(vector, text)
        routes = self.threshold is not None and p >= self.threshold
        metrics.child(metrics.ROUTER_PREDICTIONS, self.policy, "cheap" if routes else "requested").inc()
        return RouterPrediction(p, self.threshold, routes)

    def _unavailable(self) -> None:
        metrics.child(metrics.ROUTER_PREDICTIONS, self.policy, "unavailable").inc()
        return None


def build_routers(policy: PolicyFile, embedders: dict[str, Embedder]) -> dict[str, LearnedRouter]:
    """One router per `route.learned` policy (its file read and validated again: it may have changed since check)."""
    routers = {}
    for p in policy.policies:
        learned = p.route.learned if p.route is not None else None
        if learned is not None:
            try:
                file = read_router_file(learned.router)
            except RouterFileError as e:  # changed since the policy file was checked: keep the running config
                raise ConfigError(
                    [ConfigIssue(learned.router, 1, f"policies.{p.name}.route.learned", str(e))]
                ) from None
            routers[p.name] = LearnedRouter(file, embedders[learned.embedder_key], p.name, learned.target_quality)
    return routers
