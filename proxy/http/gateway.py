"""The OpenAI-compatible endpoints as a raw ASGI app: the hot path.

FastAPI's routing, dependency injection and response classes cost more CPU per request than the
whole proxy budget allows, so the API endpoints are served here directly; everything else (ops,
admin) falls through to the FastAPI app. The gateway only carries: it picks the wire adapter for the
path, reads the body, runs the pipeline, relays the upstream's reply (or the answer a step made), and
settles. Formats, usage and accounting belong to the adapters and the steps.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

import orjson

from proxy import metrics
from proxy.errors import InvalidRequest, MethodNotAllowed, ModelNotFound, ProxyError
from proxy.http.asgi import (
    SSE_HEADERS,
    ASGIApp,
    Receive,
    Scope,
    Send,
    check_content_type,
    read_body,
    request_headers,
    send_error,
    send_json,
    send_sse,
    start_message,
)
from proxy.http.endpoints import unknown_path
from proxy.pipeline.context import RequestContext
from proxy.upstream.reply import UpstreamReply, stream_reply
from proxy.wire.adapter import Endpoint, StreamAccount, WireAdapter
from proxy.wire.formats import BY_PATH

if TYPE_CHECKING:
    from proxy.http.state import ProxyState
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("llm_proxy.gateway")

_MODELS_PATHS = frozenset({"/v1/models", "/models"})
_MODEL_PREFIXES = ("/v1/models/", "/models/")
_RESPONSE_PREFIXES = ("/v1/responses/", "/responses/")
_RESPONSE_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
# Paths the ops app serves under /v1; every other /v1 path is the gateway's to refuse.
_OPS_V1_PREFIX = "/v1/proxy/"


def _proxy_headers(ctx: RequestContext, with_cost: bool) -> list[tuple[bytes, bytes]]:
    h = [
        (b"x-llm-proxy-request-id", ctx.request_id.encode()),
        (b"x-llm-proxy-route", ctx.route.encode()),
        (b"x-llm-proxy-overhead-ms", f"{ctx.overhead() * 1000:.3f}".encode()),
    ]
    model = ctx.answered_by or ctx.model
    if model:
        h.append((b"x-llm-proxy-model", model.encode()))
    if ctx.policies:
        h.append((b"x-llm-proxy-policies", ",".join(ctx.policies).encode()))
    if with_cost:
        h.append((b"x-llm-proxy-cost-usd", f"{ctx.billed():.9f}".encode()))
        h.append((b"x-llm-proxy-saved-usd", f"{ctx.saved:.9f}".encode()))
    if ctx.extra_headers:
        h += ctx.extra_headers
    return h


class _ClientWatch:
    """Cancels the request's task when the client disconnects before `done()`: a client that gives up
    stops the upstream work it asked for (and, through settle, releases what it reserved)."""

    __slots__ = ("_ctx", "_done", "_task", "_watcher")
    _watcher: asyncio.Task[None] | None

    def __init__(self, receive: Receive, ctx: RequestContext):
        self._ctx = ctx
        self._done = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._done and self._task is not None:
                    self._ctx.cancelled = True
                    self._task.cancel()
                return

    def done(self) -> None:
        self._done = True
        # Forget the watcher as it is cancelled: its cancellation's traceback holds the watch's frame,
        # and so this object; a reference back to the task would make a cycle, and then the whole
        # request (context, reply) garbage for the cyclic collector instead of freed on the spot.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()

    def absorb_cancellation(self) -> None:
        """Inside `except CancelledError`: swallow the cancellation this watch caused, re-raise any other."""
        if not self._ctx.cancelled:
            raise asyncio.CancelledError
        if self._task is not None:
            self._task.uncancel()
        self._ctx.status = 499


class Gateway:
    def __init__(self, state: ProxyState, fallback: ASGIApp):
        self.state = state
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        in_flight = self.state.in_flight  # counted for `ProxyState.stop`, which waits for them to settle
        in_flight.count += 1
        try:
            await self._route(scope, receive, send)
        finally:
            in_flight.leave()

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        method = scope["method"]
        wire = BY_PATH.get(path)
        if wire is not None:
            if method != "POST":
                await send_error(send, MethodNotAllowed(f"Use POST for {path}."), body=wire.error_body)
                return
            await (self._count if wire.counts_only else self._handle)(wire, scope, receive, send)
            return
        if path in _MODELS_PATHS and method == "GET":
            await self._models(scope, send, None)
        elif path.startswith(_MODEL_PREFIXES) and method == "GET":
            await self._models(scope, send, path.split("/models/", 1)[1])
        elif path.startswith(_RESPONSE_PREFIXES) and method in ("GET", "DELETE"):
            await self._stored_response(scope, send, method, path.split("/responses/", 1)[1])
        elif path.startswith("/v1/") and not path.startswith(_OPS_V1_PREFIX):
            await send_error(send, unknown_path(path))
        else:
            await self.fallback(scope, receive, send)

    def _bare_context(self, scope: Scope, endpoint: str) -> RequestContext:
        return RequestContext(request_id=secrets.token_hex(12), endpoint=endpoint, headers=request_headers(scope))

    async def _models(self, scope: Scope, send: Send, model_id: str | None) -> None:
        """`GET /v1/models` (the caller's team's models) and `GET /v1/models/{id}`."""
        runtime = self.state.runtime
        ctx = self._bare_context(scope, "models")
        try:
            await runtime.authenticate.on_request(ctx)
            created = int(self.state.started_at)
            models = runtime.models_for(ctx.team or "", ctx.key_rights)
            if model_id is not None and model_id not in models:
                message = f"The model '{model_id[:200]}' does not exist or is not yours to use."
                raise ModelNotFound(message, param="model")
        except ProxyError as e:
            await send_error(send, e)
            return

        def card(m: str) -> dict[str, object]:
            return {"id": m, "object": "model", "created": created, "owned_by": runtime.policy.models[m].provider}

        body = card(model_id) if model_id is not None else {"object": "list", "data": [card(m) for m in models]}
        await send_json(send, 200, orjson.dumps(body), [])

    async def _stored_response(self, scope: Scope, send: Send, method: str, response_id: str) -> None:
        """`GET` / `DELETE /v1/responses/{id}`: a response the proxy kept (it made it by translation), else
        the upstream's, at the first of the team's models that serves the Responses API."""
        runtime = self.state.runtime
        ctx = self._bare_context(scope, Endpoint.RESPONSES)
        try:
            await runtime.authenticate.on_request(ctx)
            if not _RESPONSE_ID.match(response_id):  # it goes into an upstream URL: an id, nothing else
                raise InvalidRequest("The response id must be letters, digits, '_' or '-'.", param="response_id")
            team = ctx.team or ""
            if method == "GET":
                kept = await runtime.conversations.kept_response(team, response_id)
                if kept is not None:
                    await send_json(send, 200, orjson.dumps(kept), [])
                    return
            elif await runtime.conversations.forget(team, response_id):
                deleted = {"id": response_id, "object": "response", "deleted": True}
                await send_json(send, 200, orjson.dumps(deleted), [])
                return
            if runtime.dispatcher is None:
                raise ModelNotFound("No upstream is configured.")
            reply = await runtime.dispatcher.stored_response(runtime.models_for(team), method, response_id)
        except ProxyError as e:
            await send_error(send, e)
            return
        await send_json(send, 200, reply.raw, [])

    async def _count(self, wire: WireAdapter, scope: Scope, receive: Receive, send: Send) -> None:
        """A token-counting endpoint: the checks of a request, then the upstream's count when it speaks the
        format, else the model's tokenizer's. Nothing is generated, reserved or billed."""
        runtime = self.state.runtime
        headers = request_headers(scope)
        ctx = RequestContext(request_id=secrets.token_hex(12), endpoint=wire.endpoint, headers=headers, wire=wire)
        try:
            check_content_type(headers)
            ctx.raw = await read_body(receive, headers, runtime.policy.server.max_body_bytes)
            await runtime.counting.run_request(ctx)
            tokens = await runtime.dispatcher.count_tokens(ctx) if runtime.dispatcher is not None else None
            if tokens is None:
                tokens, _ = wire.count_prompt(runtime.estimator.counter(ctx.model), ctx.body)
        except ProxyError as e:
            await send_error(send, e, _proxy_headers(ctx, False), wire.error_body)
            return
        except asyncio.CancelledError:
            return
        await send_json(send, 200, wire.count_answer(tokens), _proxy_headers(ctx, False))

    async def _handle(self, wire: WireAdapter, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.state.runtime  # this request keeps this runtime even if a reload swaps it
        headers = request_headers(scope)
        ctx = RequestContext(request_id=secrets.token_hex(12), endpoint=wire.endpoint, headers=headers, wire=wire)
        if self.state.tracing is not None:
            self.state.tracing.start(ctx)
        try:
            check_content_type(headers)
            ctx.raw = await read_body(receive, headers, runtime.policy.server.max_body_bytes)
            await runtime.pipeline.run_request(ctx)
            if ctx.answer is not None:
                await runtime.pipeline.run_response(ctx)
                body, is_sse = wire.answer_bytes(ctx.answer, ctx.stream, ctx.include_usage, ctx.body)
                await (send_sse if is_sse else _send_ok)(send, body, _proxy_headers(ctx, True))
            elif ctx.stream:
                await self._stream(ctx, runtime, receive, send)
            else:
                await self._forward(ctx, runtime, receive, send)
        except ProxyError as e:
            ctx.error = e
            ctx.status = e.status
            if not ctx.cancelled:
                # A refused or failed request still tells its cost when it spent something (an embedding).
                extra = _proxy_headers(ctx, ctx.embeddings is not None and ctx.billed() > 0)
                await send_error(send, e, extra, wire.error_body)
        except asyncio.CancelledError:
            ctx.cancelled = True
            ctx.status = 499
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Raised by read_body: the client left before its body was complete. Nobody is left to
            # answer, and it is not the proxy's error to log (uvicorn would print a traceback).
        except Exception:
            log.exception("unexpected error in request %s", ctx.request_id)
            ctx.status = 500
            err = ProxyError("The proxy failed unexpectedly; the request id is in x-llm-proxy-request-id.")
            await send_error(send, err, _proxy_headers(ctx, False), wire.error_body)
        finally:
            try:
                await runtime.pipeline.run_settle(ctx)
            finally:
                if ctx.trace is not None:
                    ctx.trace.end(ctx)

    async def _forward(self, ctx: RequestContext, runtime: Runtime, receive: Receive, send: Send) -> None:
        ctx.sent_upstream = True
        watch = _ClientWatch(receive, ctx)
        try:
            reply = await runtime.dispatcher.send(ctx)
        except asyncio.CancelledError:
            # The client left: the upstream call (or its place in a batch queue) is cancelled with it.
            watch.absorb_cancellation()
            return
        finally:
            watch.done()
        if reply.usage is None:  # a reply without usage must at least be this format's reply
            ctx.wire.check_reply(reply.data)
        if reply.batched:
            ctx.route = "batch"
        ctx.reply = reply
        await runtime.pipeline.run_response(ctx)
        await send_json(send, 200, reply.raw, _proxy_headers(ctx, True))

    async def _stream(self, ctx: RequestContext, runtime: Runtime, receive: Receive, send: Send) -> None:
        ctx.sent_upstream = True
        handle = await runtime.dispatcher.open_stream(ctx)
        # From here on the response belongs to this stream: no retry, no fallback, no JSON error.
        account = ctx.wire.stream_account(ctx.include_usage)
        watch = _ClientWatch(receive, ctx)
        responded = False
        try:
            await send(start_message(200, SSE_HEADERS + _proxy_headers(ctx, False)))
            first = True
            async for events in handle.events():
                body = account.relay(events)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    if first:
                        first = False
                        metrics.child(metrics.TIME_TO_FIRST_CHUNK, ctx.model_requested).observe(ctx.elapsed())
            if getattr(account, "owes_usage", False) and not ctx.cancelled:
                # The upstream ignored stream_options (llama.cpp does): the client still gets the usage
                # chunk it asked for, counted by the estimator, before [DONE].
                responded = True
                await self._stream_done(ctx, runtime, account, handle)
                body = account.usage_tail(ctx.usage)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            watch.done()
            # The answer is settled before the stream ends: what a step keeps of it (a conversation's
            # turn) is there when the client, seeing the end, sends its next turn.
            if not responded:
                responded = True
                await self._stream_done(ctx, runtime, account, handle)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ProxyError as e:
            # The stream broke after it began: tell the client in-band and end the stream.
            ctx.error = e
            ctx.status = e.status
            watch.done()
            await send({"type": "http.response.body", "body": ctx.wire.stream_error(e), "more_body": False})
        except asyncio.CancelledError:
            watch.absorb_cancellation()
        finally:
            watch.done()
            handle.close()
            if not responded:
                await self._stream_done(ctx, runtime, account, handle)

    @staticmethod
    async def _stream_done(ctx: RequestContext, runtime: Runtime, account: StreamAccount, handle: Any) -> None:
        """The stream's normalised reply, and the response hooks over it (its usage is known from here)."""
        ctx.reply = _stream_reply(account, handle)
        await runtime.pipeline.run_response(ctx)


def _stream_reply(account: StreamAccount, handle: Any) -> UpstreamReply:
    """A relayed stream's reply: the usage the upstream reported (a translated stream's chat usage is the
    exact one), else what the relayed events carried; the finished object the stream ended with."""
    usage = getattr(handle, "usage", None) or account.usage
    return stream_reply(account.relayed, usage, account.final, getattr(handle, "translated", False))


async def _send_ok(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send_json(send, 200, body, headers)
