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
    explored: Any = None  # (error bound, entry, similarity): went upstream to be compared with the entry
    judgeable: Any = None  # (outcome ledger, pending outcome): a hit feedback may judge


EXPLORE_BAND = 0.04  # under max_error, the matcher looks this far below the start threshold to learn


def _chat_view(wire: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The request as chat messages (the query reads the last user turn); {} when it does not translate."""
    if wire.endpoint == "chat":
        return body
    try:
        return wire.to_chat(body)
    except InvalidRequest:
        return {}


def _matcher(cfg: RetrieveAction, name: str, retrieval: Any) -> tuple[Any, Any, Any]:
    """The policy's matcher, its LLM check and its error bound. With a verifier the matcher's floor is
    the verifier's unless min_similarity/min_margin are given; a `verify:` band widens it down to the
    band; under `max_error` it looks EXPLORE_BAND lower still, to learn (the bound decides what answers)."""
    import dataclasses

    from proxy.retrieval.matcher import Matcher
    from proxy.retrieval.verifier import VerifierError, load_verifier

    matcher, check, bound = Matcher(cfg.min_similarity, cfg.min_margin, cfg.decisive_tokens), None, None
    if cfg.verifier is not None:
        try:
            verifier = load_verifier(cfg.verifier)
        except VerifierError as e:  # `check` read it; it changed since: answer nothing rather than guess
            log.error("policy %s: %s; this policy answers nothing from retrieval until it is fixed", name, e)
            return Matcher(2.0), None, None
        floor = cfg.min_similarity if cfg.explicit("min_similarity") else verifier.min_similarity
        margin = cfg.min_margin if cfg.explicit("min_margin") else 0.0
        matcher = Matcher(floor, margin, cfg.decisive_tokens, verifier)
    if retrieval is None:
        return matcher, None, None
    if cfg.verify is not None:
        check = retrieval.answer_check(cfg.verify.model, cfg.verify.timeout_s)
        matcher = dataclasses.replace(matcher, min_similarity=min(matcher.min_similarity, cfg.verify.band[0]))
    if cfg.max_error is not None:
        start = matcher.min_similarity
        matcher = dataclasses.replace(matcher, min_similarity=start - EXPLORE_BAND)
        bound = retrieval.error_bound(name, cfg.collection, cfg.max_error, start, start - EXPLORE_BAND)
    return matcher, check, bound


class Retrieve(PolicyAction):
    """Answer from a collection (knowledge base or semantic cache) when the guarded matcher is sure."""

    def __init__(self, cfg: RetrieveAction, name: str, deps: ActionDeps):
        self._cfg = cfg
        self._name = name
        self._prices = deps.prices
        self._estimator = deps.estimator
        self._retrieval = deps.retrieval  # None when the policy file uses no retrieval
        self._matcher, self._check, self._bound = _matcher(cfg, name, self._retrieval)

    def _count(self, result: str) -> None:
        metrics.RETRIEVAL_LOOKUPS.labels(self._cfg.collection, self._name, result).inc()

    async def apply(self, ctx: RequestContext) -> bool:
        if ctx.trace is None:
            return await self._look_up(ctx, None)
        attributes = {"llm_proxy.retrieval.collection": self._cfg.collection, "llm_proxy.policy": self._name}
        with ctx.trace.child(f"retrieval {self._cfg.collection}", attributes) as trace:
            hit = await self._look_up(ctx, trace)
            trace.set("llm_proxy.retrieval.hit", hit)
            return hit

    async def _look_up(self, ctx: RequestContext, trace: Any) -> bool:
        """Answer from the collection when the query matches (True), else leave the request as it is."""
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
        if self._bound is not None and self._bound.stopped:
            self._count("over_bound")  # its realised error exceeded max_error: nothing until reload
            return False
        exact = collection.exact(ctx.team, query, now)
        if exact is not None and (self._bound is None or self._bound.answers(exact.entry.id, 1.0)):
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
            vector = await embed_for_request(ctx, embedder, query.text, trace)
        except EmbedderDown as e:
            log.debug("collection %s: embedder down: %s", collection.name, e)
            self._count("embedder_down")
            return False
        lookup.vector, lookup.identity = vector, embedder.identity
        try:
            match = self._search(collection, ctx.team, query.context, vector, now, trace)
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
        if self._check is not None and match.similarity < self._cfg.verify.band[1]:
            stored = match.entry.questions[match.question]
            same = await self._check.same_question(ctx, query.text, stored)
            if not same:
                self._count("llm_rejected" if same is False else "llm_error")
                return False
        if self._bound is not None and not self._bound.answers(match.entry.id, match.similarity):
            lookup.explored = (self._bound, match.entry, match.similarity)
            self._count("explored")
            return False
        return self._answer(ctx, lookup, match.entry, match.similarity, "hit")

    @staticmethod
    def _search(collection: Any, team: str | None, context: str, vector: Any, now: float, trace: Any) -> Any:
        if trace is None:
            return collection.search(team, context, vector, now)
        with trace.child(f"search {collection.name}", {"llm_proxy.retrieval.collection": collection.name}) as span:
            match = collection.search(team, context, vector, now)
            if match is not None:
                span.set("llm_proxy.retrieval.similarity", float(match.similarity))
            return match

    def _worth_it(self, ctx: RequestContext, retrieval: Any, embedder: Any, text: str) -> bool:
        lookup_cost = retrieval.price_per_token(embedder) * retrieval.count_tokens(text)
        if self._check is not None:  # a borderline hit may cost a check as well: count it in
            lookup_cost += self._check.expected_cost(text)
        if lookup_cost <= 0:
            return True
        output = min(ctx.max_output_tokens, self._cfg.expected_output_tokens)
        generation = self._prices.cost(ctx.model, ctx.prompt_tokens, output)
        return generation >= self._cfg.min_cost_multiple * lookup_cost

    def _answer(self, ctx: RequestContext, lookup: Lookup, entry: Any, similarity: float, result: str) -> bool:
        lookup.hit = True
        if self._bound is not None:  # feedback on this request id judges the entry at this similarity
            from proxy.retrieval.error_bound import PendingOutcome

            b = self._bound
            pending = PendingOutcome(ctx.team, b.policy, b.collection, b.key, entry.id, similarity)
            lookup.judgeable = (self._retrieval.outcomes, pending)
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
                    if lookup.judgeable is not None:
                        await self._keep_judgeable(ctx, *lookup.judgeable)

    @staticmethod
    async def _keep_judgeable(ctx: RequestContext, ledger: Any, pending: Any) -> None:
        """Before the answer leaves: feedback right after it finds it, on any replica."""
        try:
            await ledger.remember(ctx.request_id, pending)
        except StoreUnavailable as e:
            log.warning("collection %s: a hit cannot be judged by feedback: %s", pending.collection, e)

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx.route != "retrieval" and ctx.lookups:
            for lookup in ctx.lookups:
                if lookup.explored is not None:
                    await self._compare(ctx, lookup)
                if lookup.fill and lookup.vector is not None:
                    await self._fill(ctx, lookup)

    async def _compare(self, ctx: RequestContext, lookup: Lookup) -> None:
        """An exploration: the upstream's answer equal to the entry's is a correct outcome, else a wrong one."""
        from proxy.retrieval.query import normalize

        if ctx.status != 200 or ctx.error is not None or ctx.cancelled or ctx.reply is None:
            return
        answer = _reply_answer(ctx.reply.events if ctx.reply.events is not None else ctx.reply.data)
        if answer is None:
            return
        bound, entry, similarity = lookup.explored
        await bound.record(entry.id, similarity, normalize(answer) == normalize(entry.answer), served=False)

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
