"""Conversation state for the Responses API over stateless upstreams: a request that continues a response
the proxy made (`previous_response_id`) gets that conversation's items as its input, and each response the
proxy made by translation is kept, readable by its team only, for `server.responses_ttl_s`.

A response an upstream made itself (an `api: responses` model) is the upstream's to keep: its id is
passed through untouched.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.pipeline.context import ConversationSlot, Endpoint, RequestContext
from proxy.pipeline.step import Step
from proxy.store.base import Store

_KEPT_STATUSES = frozenset({"completed", "incomplete"})


def _as_items(value: Any) -> list[Any]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else list(value)


def _output_items(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A response's output as the input items that replay it (without ids: no upstream knows them)."""
    items: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            text = "".join(p.get("text", "") for p in item.get("content") or () if p.get("type") == "output_text")
            items.append({"role": "assistant", "content": text})
        elif kind == "function_call":
            items.append({k: item.get(k) for k in ("type", "call_id", "name", "arguments")})
        # reasoning is not replayed: a chat upstream reasons afresh
    return items


class KeepConversation(Step):
    """Continue a kept Responses conversation (previous_response_id); keep each translated turn, per team."""

    def __init__(self, store: Store, ttl_s: float):
        self._store = store
        self._ttl_s = ttl_s

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.endpoint != Endpoint.RESPONSES:
            return
        body = ctx.body
        previous = body.get("previous_response_id")
        items = _as_items(body["input"])
        kept = None
        if previous is not None and not ctx.dry_run:
            kept = await self._store.get_conversation(ctx.team or "", previous)
            if kept is not None:
                items = [*orjson.loads(kept)["items"], *items]
                body["input"] = items
                del body["previous_response_id"]  # resolved here: no upstream is to look it up
        ctx.conversation = ConversationSlot(previous if kept is not None else None, items)

    async def on_response(self, ctx: RequestContext) -> None:
        slot, reply = ctx.conversation, ctx.reply
        if slot is None or reply is None or not reply.translated or ctx.error is not None or ctx.cancelled:
            return
        response = reply.data
        if not isinstance(response, dict) or response.get("status") not in _KEPT_STATUSES:
            return
        if slot.previous is not None:
            response["previous_response_id"] = slot.previous
            if reply.raw:  # not yet sent (a stream's events are)
                reply.raw = orjson.dumps(response)
        if ctx.body.get("store") is False:
            return
        # Kept before the answer goes out: the client's next turn may follow at once.
        kept = orjson.dumps({"response": response, "items": [*slot.items, *_output_items(response)]})
        await self._store.put_conversation(ctx.team or "", response["id"], kept, self._ttl_s)

    async def kept_response(self, team: str, response_id: str) -> dict[str, Any] | None:
        """`GET /v1/responses/{id}` of a response the proxy kept."""
        kept = await self._store.get_conversation(team, response_id)
        return orjson.loads(kept)["response"] if kept is not None else None

    async def forget(self, team: str, response_id: str) -> bool:
        """`DELETE /v1/responses/{id}` of a response the proxy kept."""
        return await self._store.delete_conversation(team, response_id)
