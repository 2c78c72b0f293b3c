"""The `retrieve` action: answer a lookup question from a collection (knowledge base or semantic
cache) instead of generating, when the guarded matcher is sure and the saving is worth it; and
`SettleRetrieval`, which prices the lookup, stores cacheable upstream answers and accounts for the
embeddings a request made.

A hit answers with a normal chat.completion (streamed as SSE when asked) whose usage is zero: no
model processed tokens. Its cost is the embedding cost; its saving the generation cost of the same
answer on the requested model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from proxy import metrics
from proxy.config.policies import RetrieveAction
from proxy.errors import InvalidRequest
from proxy.pipeline.context import RequestContext
from proxy.pipeline.deps import ActionDeps
from proxy.pipeline.step import PolicyAction, Step
from proxy.store.base import Store, StoreUnavailable
from proxy.wire import sse
from proxy.wire.formats import BY_ENDPOINT

log = logging.getLogger("llm_proxy.retrieval")


@dataclass(slots=True, eq=False)
class Lookup:
    """One retrieve policy's lookup for one request, read back when the request settles."""

    policy: str
    collection: Any  # proxy.retrieval.collection.Collection
    query: Any  # proxy.retrieval.query.RetrievalQuery
    fill: bool  # store the upstream's answer when it comes
    vector: Any = None
    identity: str | None = None
    hit: bool = False
    cost: float = 0.0


def _chat_view(wire: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The request as chat messages (the query reads the last user turn); {} when it does not translate."""
    if wire.endpoint == "chat":
        return body
    try:
        return wire.to_chat(body)
    except InvalidRequest:
        return {}


class Retrieve(PolicyAction):
    """Answer from a collection (knowledge base or semantic cache) when the guarded matcher is sure."""

    def __init__(self, cfg: RetrieveAction, name: str, deps: ActionDeps):
        from proxy.retrieval.matcher import Matcher

        self._cfg = cfg
        self._name = name
        self._prices = deps.prices
        self._estimator = deps.estimator
        self._retrieval = deps.retrieval  # None when the policy file uses no retrieval
        self._matcher = Matcher(cfg.min_similarity, cfg.min_margin, cfg.decisive_tokens)

    def _count(self, result: str) -> None:
        metrics.RETRIEVAL_LOOKUPS.labels(self._cfg.collection, self._name, result).inc()

    async def apply(self, ctx: RequestContext) -> bool:
        retrieval = self._retrieval
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        if retrieval is None or ctx.dry_run or not wire.conversational:
            return False
        from proxy.retrieval.collection import NotReady
        from proxy.retrieval.embedders import EmbedderDown, embed_for_request
        from proxy.retrieval.guards import analyse
        from proxy.retrieval.matcher import HIT
        from proxy.retrieval.query import query_from_chat

        collection = retrieval.collections.get(self._cfg.collection)
        if collection is None:
            return False
        if not wire.asks_plain_text(ctx.body):
            self._count("unsupported")
            return False
        query = query_from_chat(_chat_view(wire, ctx.body), self._cfg.system_prompt)
        if query is None:
            self._count("unsupported")
            return False
        lookup = Lookup(self._name, collection, query, fill=self._cfg.cache)
        if ctx.lookups is None:
            ctx.lookups = []
        ctx.lookups.append(lookup)
        now = time.time()
        exact = collection.exact(ctx.team, query, now)
        if exact is not None:  # the fast path: no embedding at all
            return self._answer(ctx, lookup, exact.entry, 1.0, "exact_hit")
        embedder = collection.embedder
        if self._cfg.min_cost_multiple is not None and not self._worth_it(ctx, retrieval, embedder, query.text):
            lookup.fill = False
            self._count("not_worth_it")
            return False
        if not collection.ready:
            self._count("not_ready")
            return False
        try:
            vector = await embed_for_request(ctx, embedder, query.text)
        except EmbedderDown as e:
            log.debug("collection %s: embedder down: %s", collection.name, e)
            self._count("embedder_down")
            return False
        lookup.vector, lookup.identity = vector, embedder.identity
        try:
            match = collection.search(ctx.team, query.context, vector, now)
        except NotReady:
            self._count("not_ready")
            return False
        if match is None:
            self._count("miss")
            return False
        metrics.RETRIEVAL_SIMILARITY.labels(collection.name).observe(max(0.0, match.similarity))
        verdict = self._matcher.judge(match.similarity, match.margin, analyse(query.text), match.facts)
        if verdict != HIT:
            self._count(verdict)
            return False
        return self._answer(ctx, lookup, match.entry, match.similarity, "hit")

    def _worth_it(self, ctx: RequestContext, retrieval: Any, embedder: Any, text: str) -> bool:
        lookup_cost = retrieval.price_per_token(embedder) * retrieval.count_tokens(text)
        if lookup_cost <= 0:
            return True
        output = min(ctx.max_output_tokens, self._cfg.expected_output_tokens)
        generation = self._prices.cost(ctx.model, ctx.prompt_tokens, output)
        return generation >= self._cfg.min_cost_multiple * lookup_cost

    def _answer(self, ctx: RequestContext, lookup: Lookup, entry: Any, similarity: float, result: str) -> bool:
        lookup.hit = True
        lookup.cost = ctx.embeddings.cost() if ctx.embeddings is not None else 0.0
        requested = ctx.model_requested or ctx.model
        answer_tokens = self._estimator.counter(requested).text(entry.answer)
        counterfactual = self._prices.cost(requested, ctx.prompt_tokens, answer_tokens)
        ctx.saved_by_policy[self._name] = max(0.0, counterfactual - lookup.cost)
        ctx.route = "retrieval"
        ctx.answer = {
            "id": f"chatcmpl-{ctx.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": requested,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": entry.answer, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "system_fingerprint": "llm-numbers-proxy-retrieval",
        }
        ctx.extra_headers.append(
            (
                b"x-llm-proxy-retrieval",
                f"collection={lookup.collection.name}; entry={entry.id}; similarity={similarity:.4f}".encode(),
            )
        )
        if entry.source:
            ctx.extra_headers.append((b"x-llm-proxy-retrieval-source", entry.source.encode("utf-8", "replace")))
        self._count(result)
        return True


def _reply_answer(reply: Any) -> str | None:
    """The text of a single, complete, plain upstream answer (parsed JSON or relayed SSE events)."""
    if isinstance(reply, dict):
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        message = choice.get("message")
        if choice.get("finish_reason") != "stop" or not isinstance(message, dict) or message.get("tool_calls"):
            return None
        content = message.get("content")
        return content if isinstance(content, str) and content.strip() else None
    if isinstance(reply, list):
        parts: list[str] = []
        finished = False
        for data in sse.json_payloads(reply, strict=True):
            if data is None:
                return None  # a broken event: the answer is not known whole
            for choice in data.get("choices") or ():
                if choice.get("index", 0) != 0:
                    return None
                delta = choice.get("delta") or {}
                if delta.get("tool_calls"):
                    return None
                if isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
                if choice.get("finish_reason") is not None:
                    finished = choice["finish_reason"] == "stop"
        text = "".join(parts)
        return text if finished and text.strip() else None
    return None


class SettleRetrieval(Step):
    """After the answer: price a retrieval hit; store cacheable upstream answers in their caches."""

    def __init__(self, store: Store):
        self._store = store

    async def on_response(self, ctx: RequestContext) -> None:
        if ctx.route == "retrieval" and ctx.lookups:
            for lookup in ctx.lookups:
                if lookup.hit:
                    ctx.cost = lookup.cost  # the embedding; nothing was generated
                    ctx.saved = sum(ctx.saved_by_policy.values())

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx.route != "retrieval" and ctx.lookups:
            for lookup in ctx.lookups:
                if lookup.fill and lookup.vector is not None:
                    await self._fill(ctx, lookup)

    async def _fill(self, ctx: RequestContext, lookup: Lookup) -> None:
        name = lookup.collection.name
        if ctx.status != 200 or ctx.error is not None or ctx.cancelled or ctx.reply is None:
            return
        answer = _reply_answer(ctx.reply.events if ctx.reply.events is not None else ctx.reply.data)
        if answer is None:
            metrics.RETRIEVAL_CACHE_FILLS.labels(name, "not_cacheable").inc()
            return
        try:
            stored = await lookup.collection.remember(lookup.query, ctx.team, lookup.vector, answer, lookup.identity)
        except StoreUnavailable as e:
            log.warning("cache %s: could not store an answer: %s", name, e)
            metrics.RETRIEVAL_CACHE_FILLS.labels(name, "error").inc()
            return
        metrics.RETRIEVAL_CACHE_FILLS.labels(name, "stored" if stored else "skipped").inc()
