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
    counted: bool = False  # no usage reported: the tokens were counted


class EmbeddingClient:
    def __init__(self, dispatcher: Dispatcher | None, estimator: Estimator):
        self._dispatcher = dispatcher
        self._estimator = estimator

    async def embed(self, model: str, texts: list[str], trace: Any = None) -> EmbeddingReply:
        """`trace`: the RequestTrace (tracing on) whose span each upstream attempt is a client span of."""
        if self._dispatcher is None:
            raise RuntimeError("no upstream session: embeddings cannot be called in this runtime")
        call = DispatchRequest(Endpoint.EMBEDDINGS, model, {"model": model, "input": texts}, trace=trace)
        reply = await self._dispatcher.send(call)
        data = reply.data or {}  # its shape is the embedder's to check
        answered = call.answered_by or model
        counted = reply.usage is None
        tokens = self._estimator.embedding_tokens(answered, texts) if counted else reply.usage.input
        return EmbeddingReply(data, answered, tokens, self._estimator.prices.cost(answered, tokens), counted)

    async def chat(self, model: str, body: dict[str, Any]) -> EmbeddingReply:
        """A short chat call the proxy makes for itself (retrieval's `verify:` check of a borderline hit),
        priced the same way; `tokens` are prompt and completion together."""
        if self._dispatcher is None:
            raise RuntimeError("no upstream session: checks cannot be called in this runtime")
        call = DispatchRequest(Endpoint.CHAT, model, body, max_output_tokens=int(body.get("max_tokens") or 0))
        reply = await self._dispatcher.send(call)
        data = reply.data or {}
        answered = call.answered_by or model
        usage = reply.usage
        if usage is not None:
            return EmbeddingReply(
                data, answered, usage.input + usage.output, self._estimator.prices.cost(answered, usage)
            )
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", ()))  # no usage: count it
        prompt = self._estimator.counter(answered).text(text)
        return EmbeddingReply(data, answered, prompt + 1, self._estimator.prices.cost(answered, prompt, 1), True)
