"""The master key that guards admin endpoints (`LLM_PROXY_MASTER_KEY`), compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import Forbidden, ProxyError, Unauthorized
from proxy.http.asgi import request_headers, send_error
from proxy.services.keyring import presented_key


def require_master_key(headers: Mapping[str, str], master_key: str | None) -> None:
    if not master_key:
        raise Forbidden("Admin endpoints are disabled: set LLM_PROXY_MASTER_KEY to enable them.", code="admin_disabled")
    key = presented_key({k.lower(): v for k, v in headers.items()})
    if key is None or not hmac.compare_digest(key.encode(), master_key.encode()):
        raise Unauthorized("Admin endpoints need the master key.")


class AdminGuard:
    """ASGI wrapper: every /admin path checks the master key before anything else runs.

    The handlers check it too, but FastAPI validates query parameters and redirects trailing slashes before a
    handler runs: without this guard an anonymous caller got a 400 or a 307 where it should get a 401.
    """

    def __init__(self, app: Any, master_key: Callable[[], str | None]):
        self.app = app
        self.master_key = master_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/admin" or path.startswith("/admin/"):
                try:
                    require_master_key(request_headers(scope), self.master_key())
                except ProxyError as e:
                    await send_error(send, e)
                    return
        await self.app(scope, receive, send)
