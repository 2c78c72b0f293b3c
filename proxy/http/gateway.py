"""The OpenAI-compatible endpoints as a raw ASGI app: the hot path.

FastAPI's routing, dependency injection and response classes cost more CPU per request than the
whole proxy budget allows, so the four OpenAI endpoints are served here directly; everything else
(ops, admin) falls through to the FastAPI app.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

from proxy import metrics
from proxy.errors import (
    BadGateway,
    MethodNotAllowed,
    PayloadTooLarge,
    ProxyError,
    UnsupportedMediaType,
)
from proxy.pipeline.context import Endpoint, RequestContext
from proxy.wire.sse import StreamAccount, completion_as_events, counted_reply_tokens

if TYPE_CHECKING:
    from proxy.http.state import ProxyState
    from proxy.pipeline.runtime import Runtime

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("llm_proxy.gateway")

_ENDPOINTS = {
    "/v1/chat/completions": Endpoint.CHAT,
    "/v1/completions": Endpoint.COMPLETIONS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
    "/chat/completions": Endpoint.CHAT,
    "/completions": Endpoint.COMPLETIONS,
    "/embeddings": Endpoint.EMBEDDINGS,
}
_MODELS_PATHS = frozenset({"/v1/models", "/models"})
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_content_type(headers: dict[str, str]) -> None:
    ctype = headers.get("content-type")
    if ctype is None:
        return
    media = ctype.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Unsupported content type '{media}': send the request body as application/json.")


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


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [_JSON, *headers]})
    await send({"type": "http.response.body", "body": body})


async def _send_sse(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ProxyError, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await _send_json(send, error.status, error.body(), headers + (extra or []))


def _apply_usage(ctx: RequestContext, usage: Any) -> bool:
    if not isinstance(usage, dict):
        return False
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int):
        return False
    ctx.input_tokens = prompt
    ctx.output_tokens = completion if isinstance(completion, int) else 0
    ctx.usage_known = True
    return True


class _ClientWatch:
    """Cancels the request's task when the client disconnects before `done()`: a client that gives up
    stops the upstream work it asked for (and, through settle, releases what it reserved)."""

    __slots__ = ("_ctx", "_done", "_task", "_watcher")

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
        self._watcher.cancel()

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
        endpoint = _ENDPOINTS.get(path)
        if endpoint is not None:
            if scope["method"] != "POST":
                await send_error(send, MethodNotAllowed(f"Use POST for {path}."))
                return
            await self._handle(endpoint, scope, receive, send)
            return
        if path in _MODELS_PATHS and scope["method"] == "GET":
            await self._list_models(scope, send)
            return
        await self.fallback(scope, receive, send)

    async def _list_models(self, scope: Scope, send: Send) -> None:
        runtime = self.state.runtime
        ctx = RequestContext(request_id=secrets.token_hex(12), endpoint="models", headers=_headers(scope))
        try:
            await runtime.authenticate.on_request(ctx)
        except ProxyError as e:
            await send_error(send, e)
            return
        created = int(self.state.started_at)
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": runtime.policy.models[m].provider}
            for m in runtime.models_for(ctx.team or "")
        ]
        await _send_json(send, 200, orjson.dumps({"object": "list", "data": data}), [])

    async def _handle(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.state.runtime  # this request keeps this runtime even if a reload swaps it
        headers = _headers(scope)
        ctx = RequestContext(request_id=secrets.token_hex(12), endpoint=endpoint, headers=headers)
        try:
            check_content_type(headers)
            ctx.raw = await _read_body(receive, headers, runtime.policy.server.max_body_bytes)
            await runtime.pipeline.run_request(ctx)
            if ctx.answer is not None:
                await runtime.pipeline.run_response(ctx)
                if ctx.stream and ctx.answer.get("object") == "chat.completion":
                    events = completion_as_events(ctx.answer, ctx.include_usage)
                    await _send_sse(send, events, _proxy_headers(ctx, True))
                else:
                    await _send_json(send, 200, orjson.dumps(ctx.answer), _proxy_headers(ctx, True))
            elif ctx.stream:
                await self._stream(ctx, runtime, receive, send)
            else:
                await self._forward(ctx, runtime, receive, send)
        except ProxyError as e:
            ctx.error = e
            ctx.status = e.status
            if not ctx.cancelled:
                # A refused or failed request still tells its cost when it spent something (an embedding).
                await send_error(send, e, _proxy_headers(ctx, ctx.embeddings is not None and ctx.billed() > 0))
        except asyncio.CancelledError:
            ctx.cancelled = True
            ctx.status = 499
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Raised by _read_body: the client left before its body was complete. Nobody is left to
            # answer, and it is not the proxy's error to log (uvicorn would print a traceback).
        except Exception:
            log.exception("unexpected error in request %s", ctx.request_id)
            ctx.status = 500
            err = ProxyError("The proxy failed unexpectedly; the request id is in x-llm-proxy-request-id.")
            await send_error(send, err, _proxy_headers(ctx, False))
        finally:
            await runtime.pipeline.run_settle(ctx)

    async def _forward(self, ctx: RequestContext, runtime: Runtime, receive: Receive, send: Send) -> None:
        ctx.dispatched = True
        watch = _ClientWatch(receive, ctx)
        try:
            reply = await runtime.dispatcher.send(ctx)
        except asyncio.CancelledError:
            # The client left: the upstream call (or its place in a batch queue) is cancelled with it.
            watch.absorb_cancellation()
            return
        finally:
            watch.done()
        data = reply.data
        if not _apply_usage(ctx, data.get("usage")):
            if ctx.endpoint == Endpoint.EMBEDDINGS:
                if not isinstance(data.get("data"), list):
                    raise BadGateway("The upstream's embeddings reply has no 'data' list.")
            elif not isinstance(data.get("choices"), list):
                raise BadGateway("The upstream's reply has no 'choices' list.")
            ctx.input_tokens = ctx.prompt_tokens
            if ctx.endpoint != Endpoint.EMBEDDINGS:
                ctx.output_tokens = counted_reply_tokens(data, runtime.tokens.counter(ctx.answered_by))
        ctx.reply = data
        await runtime.pipeline.run_response(ctx)
        await _send_json(send, 200, reply.raw, _proxy_headers(ctx, True))

    async def _stream(self, ctx: RequestContext, runtime: Runtime, receive: Receive, send: Send) -> None:
        ctx.dispatched = True
        handle = await runtime.dispatcher.open_stream(ctx)
        # From here on the response belongs to this stream: no retry, no fallback, no JSON error.
        account = StreamAccount(ctx.include_usage)
        watch = _ClientWatch(receive, ctx)
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + _proxy_headers(ctx, False)}
            )
            first = True
            async for events in handle.events():
                body = account.relay(events)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    if first:
                        first = False
                        metrics.child(metrics.TIME_TO_FIRST_CHUNK, ctx.model_requested).observe(ctx.elapsed())
            watch.done()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ProxyError as e:
            # The stream broke after it began: tell the client in-band and end the stream.
            ctx.error = e
            ctx.status = e.status
            watch.done()
            await send({"type": "http.response.body", "body": b"data: " + e.body() + b"\n\n", "more_body": False})
        except asyncio.CancelledError:
            watch.absorb_cancellation()
        finally:
            watch.done()
            handle.close()
            if not _apply_usage(ctx, account.usage):
                ctx.input_tokens = ctx.prompt_tokens
                ctx.output_tokens = account.counted_output_tokens(runtime.tokens.counter(ctx.answered_by))
            ctx.reply = account.relayed
            await runtime.pipeline.run_response(ctx)
