"""OpenTelemetry traces: one span per request (GenAI semantic conventions plus `llm_proxy.*`), a child
span per upstream attempt, W3C `traceparent` continued from the client and passed upstream.

On only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set; the SDK is imported
then and only then, so a proxy without tracing pays one `is None` test per request. Spans leave
through a BatchSpanProcessor (bounded queue, its own thread, a short export timeout): a collector
that is down drops spans, it never slows or fails a request. Never prompt text or keys in a span.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from proxy.upstream.trace_headers import TRACE_HEADERS

T = TypeVar("T")
log = logging.getLogger("llm_proxy.tracing")

_OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_EXPORT_TIMEOUT_S = 2.0  # unless OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT says otherwise


def tracing_from_env(env: Mapping[str, str] = os.environ) -> Tracing | None:
    """A tracer when the standard OpenTelemetry variables ask for OTLP traces, else None (off)."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    try:
        return Tracing(env)
    except ImportError as e:  # the variables ask for traces the install cannot send: say so, serve on
        log.error("OTEL_EXPORTER_OTLP_ENDPOINT is set but %s; pip install 'llm-numbers-proxy[tracing]'", e)
        return None


class Tracing:
    def __init__(self, env: Mapping[str, str]):
        from opentelemetry.context import Context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._kind_server, self._kind_client = SpanKind.SERVER, SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._in_context = set_span_in_context
        self._root, self._link = Context(), Link
        self._propagator = TraceContextTextMapPropagator()
        # The sampler comes from OTEL_TRACES_SAMPLER / _ARG (the SDK reads them; default parentbased_always_on).
        attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "llm-numbers-proxy"}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        timeout = (
            None
            if env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
            else (_EXPORT_TIMEOUT_S)
        )
        # Queue size, batch size and delay follow OTEL_BSP_*; a full queue drops spans, never waits.
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=timeout)))
        self._tracer = self.provider.get_tracer("llm_proxy")

    def start(self, ctx: Any) -> None:
        """Open the request's span (continuing the client's trace, if it sent one) as `ctx.trace`."""
        parent = self._propagator.extract(ctx.headers) if "traceparent" in ctx.headers else None
        span = self._tracer.start_span(
            _OPERATION.get(ctx.endpoint, ctx.endpoint), context=parent, kind=self._kind_server
        )
        ctx.trace = RequestTrace(self, span, _OPERATION.get(ctx.endpoint, ctx.endpoint))

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's span and the upstream attempts under it."""

    __slots__ = ("_operation", "_span", "_tracing")

    def __init__(self, tracing: Tracing, span: Any, operation: str):
        self._tracing = tracing
        self._span = span  # a NonRecordingSpan when the sampler said no: it still carries the trace id
        self._operation = operation

    async def upstream_attempt(self, model: str, call: Awaitable[T]) -> T:
        """Run one upstream attempt in a child span, its `traceparent` on the upstream request."""
        tracing = self._tracing
        span = tracing._tracer.start_span(
            f"{self._operation} {model}",
            context=tracing._in_context(self._span),
            kind=tracing._kind_client,
            attributes={"gen_ai.request.model": model},
        )
        sc = span.get_span_context()
        token = TRACE_HEADERS.set({"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"})
        try:
            return await call
        except BaseException as e:
            span.set_status(tracing._error)
            span.set_attribute("error.type", type(e).__name__)  # the type only: a message may quote the prompt
            raise
        finally:
            TRACE_HEADERS.reset(token)
            span.end()

    def child(
        self, name: str, attributes: dict[str, Any], operation: str | None = None
    ) -> AbstractContextManager[RequestTrace]:
        """A child span for the proxy's own work on the request (a retrieval lookup, an embedding), ended on
        leaving; what runs under the RequestTrace it yields nests under it (its upstream attempts named by
        `operation`, else by the request's)."""
        tracing = self._tracing
        span = tracing._tracer.start_span(name, context=tracing._in_context(self._span), attributes=attributes)
        return self._under(span, operation)

    def follow_up(self, name: str, attributes: dict[str, Any]) -> AbstractContextManager[RequestTrace]:
        """The root span of a trace of its own, linked to this request's span: for work the proxy does for
        itself after the answer (a shadow call), which OpenTelemetry models as a link, not a child: it
        starts after the request's span ended, is not part of its latency, and is sampled on its own."""
        tracing = self._tracing
        link = tracing._link(self._span.get_span_context())
        span = tracing._tracer.start_span(name, context=tracing._root, links=[link], attributes=attributes)
        return self._under(span)

    @contextmanager
    def _under(self, span: Any, operation: str | None = None) -> Iterator[RequestTrace]:
        tracing = self._tracing
        try:
            yield RequestTrace(tracing, span, operation or self._operation)
        except BaseException as e:
            span.set_status(tracing._error)
            span.set_attribute("error.type", type(e).__name__)
            raise
        finally:
            span.end()

    def set(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def end(self, ctx: Any) -> None:
        """Close the request's span with what the request came to (after it settled)."""
        span = self._span
        if not span.is_recording():  # not sampled: nothing to describe
            span.end()
            return
        operation = self._operation
        model = ctx.answered_by or ctx.model
        if ctx.model_requested:
            span.update_name(f"{operation} {ctx.model_requested}")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "http.response.status_code": ctx.status,
            "llm_proxy.request_id": ctx.request_id,
            "llm_proxy.route": ctx.route,
            "llm_proxy.cost_usd": ctx.billed(),
            "llm_proxy.saved_usd": ctx.saved,
            "llm_proxy.overhead_ms": ctx.overhead() * 1000,
        }
        if ctx.model_requested:
            attributes["gen_ai.request.model"] = ctx.model_requested
        if model:
            attributes["gen_ai.response.model"] = model
        if ctx.usage is not None:
            attributes["gen_ai.usage.input_tokens"] = ctx.input_tokens
            attributes["gen_ai.usage.output_tokens"] = ctx.output_tokens
        if ctx.max_output_tokens:
            attributes["gen_ai.request.max_tokens"] = ctx.max_output_tokens
        if ctx.team:
            attributes["llm_proxy.team"] = ctx.team
        if ctx.policies:
            attributes["llm_proxy.policies"] = list(ctx.policies)
        if ctx.lookups:
            attributes["llm_proxy.retrieval.collections"] = [lookup.collection.name for lookup in ctx.lookups]
            attributes["llm_proxy.retrieval.hit"] = any(lookup.hit for lookup in ctx.lookups)
        if ctx.error is not None or ctx.status >= 500:
            attributes["error.type"] = (ctx.error.code or type(ctx.error).__name__) if ctx.error else str(ctx.status)
            if ctx.status >= 500:
                span.set_status(self._tracing._error)
        span.set_attributes(attributes)
        span.end()
