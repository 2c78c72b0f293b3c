"""The master key that guards admin endpoints (`LLM_PROXY_MASTER_KEY`), compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from proxy.errors import Forbidden, Unauthorized
from proxy.steps.auth import presented_key


def require_master_key(headers: Mapping[str, str], master_key: str | None) -> None:
    if not master_key:
        raise Forbidden("Admin endpoints are disabled: set LLM_PROXY_MASTER_KEY to enable them.", code="admin_disabled")
    key = presented_key({k.lower(): v for k, v in headers.items()})
    if key is None or not hmac.compare_digest(key.encode(), master_key.encode()):
        raise Unauthorized("Admin endpoints need the master key.")
