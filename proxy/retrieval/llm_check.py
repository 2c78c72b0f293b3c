"""The optional LLM check of a borderline retrieval hit (`retrieve: {verify: {model, band}}`): a cheap
model from `models:` is asked whether an answer to the stored question answers the new one. It runs
through the runtime's client for the proxy's own calls (its dispatcher: retries, fallbacks); its tokens
and cost are the request's, recorded with its lookup's cost like a lookup embedding."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy.errors import ProxyError
from proxy.retrieval.embedders import EmbeddingCall, EmbeddingHolder, RequestEmbeddings

log = logging.getLogger("llm_proxy.retrieval")

PROMPT = (
    "You decide whether a cached answer may be reused. Reply with exactly one word: yes if any correct answer "
    "to the stored question is also a correct and complete answer to the new question, otherwise no."
)
EXPECTED_TOKENS = 90  # the prompt's overhead besides the two questions, for the cost-multiple gate


class AnswerCheck:
    def __init__(self, model: str, client: Any, prices: Any, timeout_s: float):
        self.model = model
        self._client = client  # proxy.services.embedding_client.EmbeddingClient
        self._prices = prices
        self._timeout = timeout_s

    def expected_cost(self, query: str, question: str | None = None) -> float:
        tokens = EXPECTED_TOKENS + (len(query) + len(question if question is not None else query)) // 4
        return self._prices.cost(self.model, tokens, 1)

    async def same_question(self, ctx: EmbeddingHolder, query: str, stored: str) -> bool | None:
        """True/False as the model says; None when it could not say (treated as no by the caller)."""
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": PROMPT},
                {"role": "user", "content": f"Stored question: {stored}\nNew question: {query}"},
            ],
            "max_tokens": 2,
            "temperature": 0,
        }
        try:
            reply = await asyncio.wait_for(self._client.chat(self.model, body), self._timeout)
        except (TimeoutError, ProxyError, RuntimeError) as e:
            log.debug("retrieval check on %s failed: %s", self.model, e)
            return None
        if ctx.embeddings is None:
            ctx.embeddings = RequestEmbeddings()
        ctx.embeddings.calls.append(EmbeddingCall(reply.model, reply.tokens, reply.cost, reply.counted))
        try:
            text = reply.data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        word = text.strip().lower().strip(".!\"'") if isinstance(text, str) else ""
        return True if word.startswith("yes") else False if word.startswith("no") else None
