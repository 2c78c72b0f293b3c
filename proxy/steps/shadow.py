"""Shadow sampling: for a sampled fraction of requests, keep the request as the client sent it before the
policies change it; once the client has its answer, queue the comparison of the policy's answer with the
counterfactual's (proxy/services/evaluation.py runs it in the background). Nothing here waits on an upstream.

Chat Completions, the Responses API and Anthropic Messages are shadowed: the request is kept in the client's
format (a Responses request continuing a kept conversation with its history already in `input`), and the
answer is read from what the client received in that format.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.config.models import PolicyFile
from proxy.pipeline.context import Endpoint, RequestContext, ShadowSlot
from proxy.pipeline.step import Step
from proxy.services.evaluation import ShadowEvaluator, ShadowJob
from proxy.services.holdout_stats import TREATED, holdout_bucket
from proxy.wire.content import reply_text
from proxy.wire.formats import BY_ENDPOINT

# The generation formats a counterfactual can be sent in (a completions or embeddings request is not shadowed).
SHADOWED_ENDPOINTS = frozenset({Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.MESSAGES})


def shadow_draw(request_id: str) -> float:
    """The request's sampling draw in [0, 1): apart from the conciseness hold-out's, so that shadowed
    requests are not all held out."""
    return holdout_bucket(request_id + "/shadow")


class SampleForShadow(Step):
    """Keep a sampled request as sent; after the answer, queue its shadow comparison (off the client's path)."""

    def __init__(self, policy: PolicyFile, evaluator: ShadowEvaluator):
        assert policy.evaluation is not None
        self._evaluator = evaluator
        self._shadowed = [(p.name, p.action, p.shadow) for p in policy.policies if p.shadow is not None]
        self._max_rate = max((s.rate for _, _, s in self._shadowed), default=0.0)
        self._excluded = frozenset(policy.evaluation.exclude_teams)
        self._retain_s = {n: t.retain_prompts.ttl for n, t in policy.teams.items() if t.retain_prompts is not None}

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.dry_run or ctx.endpoint not in SHADOWED_ENDPOINTS or ctx.team is None or ctx.team in self._excluded:
            return
        draw = shadow_draw(ctx.request_id)
        if draw >= self._max_rate:
            return
        # A copy, as the policies after this step edit the body in place (messages, instructions, max_tokens).
        # It is taken after KeepConversation: a Responses request's stored history is already its input.
        ctx.shadow = ShadowSlot(draw, orjson.loads(orjson.dumps(ctx.body)), ctx.model)

    async def on_settle(self, ctx: RequestContext) -> None:
        slot = ctx.shadow
        if slot is None or ctx.status != 200 or ctx.error is not None or ctx.cancelled or not ctx.policies:
            return
        ctx.shadow = None  # the copy is the job's from here on
        for name, action, cfg in self._shadowed:
            if slot.draw >= cfg.rate or name not in ctx.policies:
                continue
            answered = self._changed(ctx, name, action)
            if answered is None:
                continue
            answer = _answer_text(ctx)
            if answer:
                team = ctx.team or ""
                retain = self._retain_s.get(team)
                job = ShadowJob(
                    name,
                    cfg.compare,
                    team,
                    answered,
                    slot.model,
                    slot.body,
                    answer,
                    ctx.trace,
                    retain,
                    endpoint=ctx.endpoint,
                    upstream_headers=ctx.upstream_headers,
                )
                self._evaluator.submit(job)
            return  # one comparison per request: for the first sampled policy that changed it

    @staticmethod
    def _changed(ctx: RequestContext, name: str, action: str) -> str | None:
        """What answered in place of the requested model when policy `name` changed the request, else None."""
        if action == "route":
            model = ctx.answered_by or ctx.model
            return model if name in ctx.routed_by and model != ctx.model_requested else None
        if action == "concise":
            return (ctx.answered_by or ctx.model) if ctx.experiments.get(name) == TREATED else None
        if action == "retrieve" and ctx.route == "retrieval":
            for lookup in ctx.lookups or ():
                if lookup.policy == name and lookup.hit:
                    return f"retrieval:{lookup.collection.name}"
        return None


def _answer_text(ctx: RequestContext) -> str:
    """The text the client received: a step's answer (a chat completion, sent in the client's format), the
    upstream's reply or the stream's relayed events, both in the client's format (translated back already
    when the upstream speaks only chat)."""
    if ctx.answer is not None:
        return reply_text(ctx.answer)
    reply = ctx.reply
    if reply is None:
        return ""
    wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
    if reply.events is not None:
        return wire.stream_text(reply.events)
    data: Any = reply.data or {}
    return wire.reply_text(data)
