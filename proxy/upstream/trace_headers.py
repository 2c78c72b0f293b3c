"""The trace context an upstream call carries (`traceparent`), set around one attempt by the tracer.

A context variable, so the request's task passes it to the HTTP call without every upstream's
signature knowing about traces; unset (the default) when tracing is off.
"""

from __future__ import annotations

from contextvars import ContextVar

TRACE_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("llm_proxy_trace_headers", default=None)
