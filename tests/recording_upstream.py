"""The project's mock upstream, served in-process on a loopback port with two test-side additions:
it records the headers of every request it receives (so a test can prove which client headers reach
an upstream), and it answers a body its handlers cannot use with an OpenAI-shaped 400, as a real
upstream does (so a fuzzer's odd pass-through fields never read as an upstream failure)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import httpx
import orjson
from aiohttp import web

from proxy.fakes.mock_state import MockState
from proxy.fakes.mock_upstream import build_mock_app
from tests.conftest import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad_body(message: str) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return web.Response(body=orjson.dumps({"error": error}), status=400, content_type="application/json")


class RecordingUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers: list[dict[str, str]] = []
        self.bad_bodies = 0  # requests answered 400 because a handler could not use the body
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="recording-upstream", daemon=True)

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if request.path == "/v1/completions" and b'"stream":true' in await request.read():
            # The mock does not stream completions; say so as an upstream without the feature would.
            return _bad_body("this upstream does not stream completions")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, MemoryError) as e:
            self.bad_bodies += 1
            return _bad_body(f"cannot use this body ({type(e).__name__})")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = build_mock_app(MockState())
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> RecordingUpstream:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the recording upstream did not start")
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self) -> None:
        httpx.post(self.url + "/mock/reset").raise_for_status()
        self.headers.clear()

    def stats(self) -> dict:
        return httpx.get(self.url + "/mock/stats").json()

    def calls(self) -> int:
        """Every request the OpenAI endpoints received."""
        return sum(self.stats()["calls"].values())
