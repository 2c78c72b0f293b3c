"""Pass-through to any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, TEI, ...).

The fast path: one pooled aiohttp session, orjson, the response bytes relayed as received. Streams
are relayed event by event as they arrive.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from proxy.config.models import ModelConfig
from proxy.errors import BadGateway, UpstreamHTTPError
from proxy.upstream.reply import UpstreamReply
from proxy.upstream.retries import RetryableUpstreamError, parse_retry_after
from proxy.upstream.trace_headers import TRACE_HEADERS

OPENAI_API_BASE = "https://api.openai.com/v1"
_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",  # an `api: responses` model: OpenAI's Responses API, forwarded as is
    "responses_input_tokens": "/responses/input_tokens",
}
# Only these endpoints take `stream_options.include_usage` (the Responses API reports usage at its end anyway).
_STREAM_USAGE_ENDPOINTS = frozenset({"chat", "completions"})


class StreamHandle:
    """An open upstream SSE stream. Iterate `events()`; always `close()`."""

    usage = None  # a stream relayed as it came tells its own usage, in its events

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response

    async def events(self) -> AsyncIterator[bytes]:
        """Complete SSE events (each ending in a blank line), relayed as soon as each is whole. The
        events one upstream read completes come as one bytes: one write to the client instead of
        one per event (a write costs as much CPU as the rest of relaying an event)."""
        buf = b""
        try:
            async for chunk in self._response.content.iter_any():
                buf += chunk
                if b"\n\n" not in buf and b"\r\n\r\n" not in buf:
                    continue
                if b"\r\n" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                *complete, buf = buf.split(b"\n\n")
                events = b"".join([event + b"\n\n" for event in complete if event])
                if events:
                    yield events
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            raise BadGateway(f"The upstream stream broke off: {type(e).__name__}") from None
        except TimeoutError:
            raise BadGateway("The upstream stream stalled past the model's timeout.") from None
        if buf.strip():
            yield buf + b"\n\n"

    def close(self) -> None:
        # Closing (not releasing) drops the connection, which is how an upstream learns to stop generating.
        self._response.close()


def _error_kind(status: int) -> str:
    return "429" if status == 429 else "5xx"


# An upstream's own explanation of a 4xx, relayed to the client: bounded, on one line.
MAX_UPSTREAM_MESSAGE = 1000
_TAG = re.compile(r"<[^>]{0,200}>")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]+")


def _detail_text(item: object) -> str:
    """One entry of FastAPI's (infinity's, TEI's) `detail` list, `{"loc": [...], "msg": "..."}`, as
    `body.input: msg`; its `input` (which may echo the client's text) is left out."""
    if isinstance(item, dict) and isinstance(item.get("msg"), str):
        loc = item.get("loc")
        where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
        return f"{where}: {item['msg']}" if where else item["msg"]
    return item if isinstance(item, str) else orjson.dumps(item).decode()


def upstream_error_message(body: bytes) -> str:
    """The message of a 4xx body that is not an OpenAI error: `detail` (FastAPI), `message`, `error`
    (a string), or the text itself with any HTML tags dropped; control characters become spaces and the
    length is bounded."""
    text: str | None = None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        found = next((data[k] for k in ("detail", "message", "error", "msg") if data.get(k)), None)
        if isinstance(found, list):
            text = "; ".join(_detail_text(item) for item in found[:10])
        elif found is not None:
            text = found if isinstance(found, str) else orjson.dumps(found).decode()
    if text is None:
        text = _TAG.sub(" ", body[: MAX_UPSTREAM_MESSAGE * 4].decode("utf-8", "replace"))
    text = _CONTROL_OR_SPACE.sub(" ", text).strip()
    if len(text) > MAX_UPSTREAM_MESSAGE:
        text = text[: MAX_UPSTREAM_MESSAGE - 1] + "…"
    return text or "(no explanation)"


def openai_error_body(status: int, body: bytes) -> bytes:
    """A non-OpenAI 4xx body wrapped into the OpenAI error shape, keeping the upstream's message."""
    message = f"The upstream answered HTTP {status}: {upstream_error_message(body)}"
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})


def _looks_like_openai_error(body: bytes) -> bool:
    if body.lstrip()[:1] != b"{":
        return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and "error" in data


class OpenAICompatUpstream:
    """One configured model served by an OpenAI-compatible HTTP API."""

    def __init__(self, name: str, cfg: ModelConfig, session: aiohttp.ClientSession, connect_timeout_s: float):
        self.name = name
        self.cfg = cfg
        self._session = session
        self._base = cfg.api_base or OPENAI_API_BASE
        self._upstream_model = cfg.upstream_model or name
        self._headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=connect_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=cfg.timeout_s
        )

    def _payload(self, body: dict[str, Any], stream: bool, include_usage: bool, endpoint: str = "chat") -> bytes:
        out = {**body, "model": self._upstream_model}
        if stream and self.cfg.stream_usage and not include_usage and endpoint in _STREAM_USAGE_ENDPOINTS:
            out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(out)

    async def _post(
        self,
        path: str,
        payload: bytes | None,
        timeout: aiohttp.ClientTimeout,
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        try:
            trace = TRACE_HEADERS.get()  # the attempt's traceparent, when tracing is on
            if trace is not None:
                headers = {**(headers or {}), **trace}
            return await self._session.request(
                method,
                self._base + path,
                data=payload,
                headers={**self._headers, **headers} if headers else self._headers,
                timeout=timeout,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise RetryableUpstreamError("connect", type(e).__name__) from None
        except TimeoutError:
            raise RetryableUpstreamError("timeout", "no response before the timeout") from None

    @staticmethod
    def _raise_for_status(resp: aiohttp.ClientResponse, body: bytes) -> None:
        status = resp.status
        if status < 400:
            return
        if status == 429 or status >= 500:
            raise RetryableUpstreamError(
                _error_kind(status),
                f"HTTP {status}",
                status=status,
                body=body,
                retry_after=parse_retry_after(resp.headers.get("retry-after")),
            )
        # A 4xx is about the request: relayed with its status, its body wrapped into the OpenAI shape when
        # the server speaks another (infinity's and TEI's FastAPI `{"detail": [...]}`), so the client
        # still reads the server's explanation.
        raise UpstreamHTTPError(status, body if _looks_like_openai_error(body) else openai_error_body(status, body))

    async def send(self, endpoint: str, body: dict[str, Any]) -> UpstreamReply:
        return await self.post_json(_PATHS[endpoint], body)

    async def post_json(self, path: str, body: dict[str, Any]) -> UpstreamReply:
        """POST one JSON body to `api_base + path` and parse the JSON object it answers (the
        micro-batcher's batch endpoint uses this too)."""
        return await self._json_reply(await self._post(path, self._payload(body, False, False), self._timeout))

    async def stored_response(self, method: str, response_id: str) -> UpstreamReply:
        """GET or DELETE a response the upstream stored (`/responses/{id}`)."""
        return await self._json_reply(await self._post(f"/responses/{response_id}", None, self._timeout, method))

    async def _json_reply(self, resp: aiohttp.ClientResponse) -> UpstreamReply:
        try:
            raw = await resp.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            raise RetryableUpstreamError("connect", f"connection lost while reading: {type(e).__name__}") from None
        except TimeoutError:
            raise RetryableUpstreamError("timeout", "the response did not complete before the timeout") from None
        finally:
            resp.release()
        self._raise_for_status(resp, raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadGateway("The upstream answered with a body that is not JSON.") from None
        if not isinstance(data, dict):
            raise BadGateway("The upstream answered with JSON that is not an object.")
        return UpstreamReply(data, raw)

    async def open_stream(self, endpoint: str, body: dict[str, Any], include_usage: bool) -> StreamHandle:
        payload = self._payload(body, True, include_usage, endpoint)
        return await self._checked_stream(await self._post(_PATHS[endpoint], payload, self._stream_timeout))

    async def _checked_stream(self, resp: aiohttp.ClientResponse) -> StreamHandle:
        """An upstream's answer to a stream request: its error raised, or the open stream."""
        if resp.status >= 400:
            try:
                raw = await asyncio.wait_for(resp.read(), timeout=self.cfg.timeout_s)
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                resp.release()
            self._raise_for_status(resp, raw)
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            resp.close()
            raise BadGateway(f"The upstream answered a stream request with content-type '{ctype or 'none'}'.")
        return StreamHandle(resp)
