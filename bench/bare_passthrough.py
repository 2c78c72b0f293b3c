"""The floor: a bare pass-through (raw ASGI, one pooled aiohttp call, orjson, no policy at all).

bench/overhead.py and bench/hot_path.py run it beside the proxy so the proxy's CPU per request can be
read as a multiple of the least any Python pass-through can spend. A `stream: true` body is relayed
chunk by chunk as it arrives (the floor for streams).
"""

from __future__ import annotations

import os

import aiohttp
import orjson

UPSTREAM = os.environ.get("BARE_UPSTREAM", "http://127.0.0.1:8090/v1/chat/completions")
_SSE = [(b"content-type", b"text/event-stream")]


class BarePassthrough:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        data = orjson.loads(body)
        if data.get("stream"):
            async with self.session.post(
                UPSTREAM, data=orjson.dumps(data), headers={"Content-Type": "application/json"}
            ) as r:
                await send({"type": "http.response.start", "status": r.status, "headers": _SSE})
                async for chunk in r.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        async with self.session.post(
            UPSTREAM, data=orjson.dumps(data), headers={"Content-Type": "application/json"}
        ) as r:
            raw = await r.read()
        orjson.loads(raw)
        await send(
            {"type": "http.response.start", "status": r.status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": raw})


app = BarePassthrough()
