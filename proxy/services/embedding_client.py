"""Embedding calls the proxy makes for itself (retrieval lookups, task examples, dimension probes):
through the runtime's dispatcher, with its retries and fallbacks, priced from the price book and
counted like any call when the upstream reports no usage. The request they were made for accounts
for them (its budget, its rate limits, its spend)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.services.estimator import Estimator
from proxy.upstream.dispatch import Dispatcher, DispatchRequest
from proxy.wire.adapter import Endpoint


@dataclass(slots=True)
class EmbeddingReply:
    data: dict[str, Any]
    model: str  # the model that answered (after fallbacks)
    tokens: int
    cost: float


class EmbeddingClient:
    def __init__(self, dispatcher: Dispatcher | None, estimator: Estimator):
        self._dispatcher = dispatcher
        self._estimator = estimator

    async def embed(self, model: str, texts: list[str]) -> EmbeddingReply:
        if self._dispatcher is None:
            raise RuntimeError("no upstream session: embeddings cannot be called in this runtime")
        call = DispatchRequest(Endpoint.EMBEDDINGS, model, {"model": model, "input": texts})
        reply = await self._dispatcher.send(call)
        data = reply.data or {}  # its shape is the embedder's to check
        answered = call.answered_by or model
        tokens = reply.usage.input if reply.usage is not None else self._estimator.embedding_tokens(answered, texts)
        return EmbeddingReply(data, answered, tokens, self._estimator.prices.cost(answered, tokens))
