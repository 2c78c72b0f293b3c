"""Raw ASGI plumbing shared by the gateway and the admin guard: types, request headers and body, and
the one writer of JSON and SSE responses and errors."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from functools import cache
from typing import Any

from proxy.errors import PayloadTooLarge, ProxyError, UnsupportedMediaType

log = logging.getLogger("llm_proxy.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = (b"content-type", b"application/json")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# What an HTTP server refuses in a header value (uvicorn's check): one such byte would make it drop the
# connection without any response.
_UNSAFE_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
Headers = list[tuple[bytes, bytes]]


@cache
def _warn_dropped(name: bytes) -> None:
    # Once per header name: the values are validated where they enter, so this is a bug to fix, not traffic.
    log.error("dropped response header %s: its value has control characters", name.decode("latin-1"))


def safe_headers(headers: Headers) -> Headers:
    """`headers` without any whose value an HTTP server would refuse (a line break, a NUL): a value copied
    from somewhere can never cost the client its response."""
    if not _UNSAFE_HEADER_VALUE.search(b"".join([v for _, v in headers])):
        return headers
    kept = []
    for name, value in headers:
        if _UNSAFE_HEADER_VALUE.search(value):
            _warn_dropped(name)
        else:
            kept.append((name, value))
    return kept


def start_message(status: int, headers: Headers) -> dict[str, Any]:
    """The `http.response.start` message: the one place response headers are written."""
    return {"type": "http.response.start", "status": status, "headers": safe_headers(headers)}


def request_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
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


async def send_json(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send(start_message(status, [JSON, *headers]))
    await send({"type": "http.response.body", "body": body})


async def send_sse(send: Send, body: bytes, headers: Headers) -> None:
    await send(start_message(200, SSE_HEADERS + headers))
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    error: ProxyError,
    extra: Headers | None = None,
    body: Callable[[ProxyError], bytes] | None = None,
) -> None:
    """An error response; `body` makes it in the endpoint's format's shape (OpenAI's by default)."""
    headers = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send_json(send, error.status, body(error) if body else error.body(), headers + (extra or []))
