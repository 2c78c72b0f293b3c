"""`POST /v1/proxy/feedback` {request_id, rating: good|bad}: a client's verdict on a retrieval answer.
It is a verified outcome for the policy's error bound (`retrieve: {max_error: ...}`): the entry that
answered learns at what similarity it is right, and the collection's realised error is updated. Only the
team whose request it was may judge it, once; anything else changes nothing."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from proxy.errors import Forbidden, InvalidRequest, NotFound, ProxyError, StoreDown, Unauthorized
from proxy.http.asgi import check_content_type
from proxy.services.keyring import presented_key
from proxy.store.base import StoreUnavailable
from proxy.wire.json_body import parse_body

if TYPE_CHECKING:
    from proxy.http.state import ProxyState

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_RATINGS = ("good", "bad")


class AlreadyJudged(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "already_judged"


def add_feedback_routes(app: FastAPI, state: ProxyState) -> None:
    @app.post("/v1/proxy/feedback")
    async def proxy_feedback(request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = presented_key(headers)
        found = state.runtime.keyring.team_for(key) if key else None
        if found is None:
            raise Unauthorized("Invalid API key." if key else "Missing API key: send 'Authorization: Bearer <key>'.")
        team = found[0]
        check_content_type(headers)
        body = parse_body(await request.body())
        request_id, rating = body.get("request_id"), body.get("rating")
        if set(body) - {"request_id", "rating"}:
            raise InvalidRequest(f"Unknown field(s): {', '.join(sorted(set(body) - {'request_id', 'rating'}))}.")
        if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
            raise InvalidRequest("'request_id' must be the x-llm-proxy-request-id of one of your requests.")
        if rating not in _RATINGS:
            raise InvalidRequest("'rating' must be 'good' or 'bad'.")
        ledger = state.retrieval.outcomes if state.retrieval is not None else None
        runtime = state.runtime.retrieval
        try:
            pending = await ledger.find(request_id) if ledger is not None else None
            if pending is None:
                raise NotFound(
                    f"No retrieval answer with request id '{request_id}' to judge (or it is over a day old)."
                )
            if pending.team != team:
                raise Forbidden("That request was made by another team.", code="not_your_request")
            bound = runtime.bound_of(pending.policy, pending.collection) if runtime is not None else None
            if bound is None or bound.key != pending.bound:
                raise NotFound(f"Request '{request_id}' was answered under a policy that has changed since.")
            if not await ledger.judge(request_id):
                raise AlreadyJudged(f"Request '{request_id}' was judged already; one verdict per request counts.")
        except StoreUnavailable as e:
            raise StoreDown(f"Nothing was recorded: the store is unavailable ({e}).") from None
        await bound.record(pending.entry_id, pending.similarity, rating == "good", served=True)
        status = bound.status()
        out = {
            "request_id": request_id,
            "recorded": True,
            "collection": bound.collection,
            "realised_error": status["realised_error"],
            "answering": status["answering"],
        }
        return Response(orjson.dumps(out), media_type="application/json")
