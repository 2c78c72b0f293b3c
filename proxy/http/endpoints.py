"""The endpoints this proxy serves, as a client reads them in a 404: a wrong path names what exists."""

from __future__ import annotations

from proxy.errors import NotFound

ENDPOINTS = (
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "GET|DELETE /v1/responses/{id}",
    "POST /v1/responses/input_tokens",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    "GET /v1/models",
    "GET /v1/models/{id}",
    "POST /v1/proxy/explain",
    "POST /v1/proxy/feedback",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "/admin/*",
)


def unknown_path(path: str) -> NotFound:
    # The path is the client's: only its printable ASCII, and not all of a long one, goes into the message.
    shown = "".join(c for c in path[:200] if 32 < ord(c) < 127)
    return NotFound(f"Unknown path '{shown}'. This proxy serves: {', '.join(ENDPOINTS)}.", code="unknown_path")
