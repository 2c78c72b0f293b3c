"""Dispatch: call the chosen model with retries, then its `fallbacks:` in order.

Streams are retried and fall back only until the stream is open: once the first byte has gone to
the client, a failure ends the stream.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from proxy import metrics
from proxy.config.models import ModelConfig, PolicyFile, RetryConfig
from proxy.errors import BadGateway, ProxyError
from proxy.upstream.batcher import BatchedReply, MicroBatcher
from proxy.upstream.openai_compat import OpenAICompatUpstream
from proxy.upstream.reply import UpstreamReply
from proxy.upstream.retries import RetryableUpstreamError, call_with_retries

T = TypeVar("T")

PASS_THROUGH_PROVIDERS = frozenset({"openai"})


class Call(Protocol):
    """What the dispatcher reads of a call (a RequestContext, or a DispatchRequest the proxy makes for
    itself), and the two fields it writes back: who answered, and the time spent upstream."""

    endpoint: str
    model: str | None
    model_requested: str | None
    body: dict[str, Any]
    include_usage: bool
    fallback_to_requested: bool
    prompt_tokens: int
    max_output_tokens: int
    answered_by: str | None
    upstream_seconds: float
    trace: Any  # the request's trace (proxy.services.tracing.RequestTrace) when tracing is on, else None


@dataclass(slots=True, eq=False)
class DispatchRequest:
    """A call the proxy makes on its own behalf (an embedding for retrieval)."""

    endpoint: str
    model: str
    body: dict[str, Any]
    model_requested: str | None = None
    include_usage: bool = False
    fallback_to_requested: bool = False
    prompt_tokens: int = 0  # 0: not counted (the micro-batcher then counts for itself)
    max_output_tokens: int = 0
    answered_by: str | None = None
    upstream_seconds: float = field(default=0.0)
    trace: Any = None


def _traced(ctx: Call, name: str, upstream: Upstream, call: Callable[[Upstream], Awaitable[T]]) -> Any:
    """One upstream attempt in a child span of the request's trace (each retry gets its own)."""
    return lambda: ctx.trace.upstream_attempt(name, call(upstream))


class Stream(Protocol):
    def events(self) -> Any: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    name: str
    cfg: ModelConfig

    async def send(self, endpoint: str, body: dict[str, Any]) -> UpstreamReply: ...

    async def open_stream(self, endpoint: str, body: dict[str, Any], include_usage: bool) -> Stream: ...


def build_upstream(name: str, cfg: ModelConfig, session: aiohttp.ClientSession, connect_timeout_s: float) -> Upstream:
    if cfg.provider in PASS_THROUGH_PROVIDERS:
        upstream = OpenAICompatUpstream(name, cfg, session, connect_timeout_s)
        return MicroBatcher(upstream) if cfg.batching is not None else upstream
    from proxy.upstream.litellm_adapter import LiteLLMUpstream

    return LiteLLMUpstream(name, cfg)


def _send(upstream: Upstream, ctx: Call) -> Awaitable[UpstreamReply]:
    if isinstance(upstream, MicroBatcher):
        # The one place the batcher reads the context: the tokens a request holds in the model's memory
        # (0 when nobody counted them, as for the proxy's own embedding calls: the batcher then counts).
        return upstream.send(ctx.endpoint, ctx.body, (ctx.prompt_tokens + ctx.max_output_tokens) or None)
    return upstream.send(ctx.endpoint, ctx.body)


class Dispatcher:
    def __init__(self, policy: PolicyFile, session: aiohttp.ClientSession):
        connect = policy.server.connect_timeout_s
        self._upstreams: dict[str, Upstream] = {
            name: build_upstream(name, cfg, session, connect) for name, cfg in policy.models.items()
        }
        self._retry: dict[str, RetryConfig] = {
            name: cfg.retries or policy.retries for name, cfg in policy.models.items()
        }
        self._chain: dict[str, list[str]] = {name: [name, *cfg.fallbacks] for name, cfg in policy.models.items()}

    async def _with_fallbacks(self, ctx: Call, call: Callable[[Upstream], Awaitable[T]]) -> T:
        chain = self._chain[ctx.model]
        requested = ctx.model_requested
        if ctx.fallback_to_requested and requested not in chain and requested in self._upstreams:
            chain = [*chain, requested]
        last: ProxyError | None = None
        for i, name in enumerate(chain):
            upstream = self._upstreams[name]
            if i > 0:
                metrics.FALLBACKS.labels(chain[0], name).inc()

            def on_retry(e: RetryableUpstreamError, model: str = name) -> None:
                metrics.UPSTREAM_ERRORS.labels(model, e.kind).inc()
                metrics.RETRIES.labels(model).inc()

            started = time.perf_counter()
            try:
                attempt = (lambda u=upstream: call(u)) if ctx.trace is None else _traced(ctx, name, upstream, call)
                result = await call_with_retries(attempt, self._retry[name], on_retry)
            except RetryableUpstreamError as e:
                metrics.UPSTREAM_ERRORS.labels(name, e.kind).inc()
                last = e.as_proxy_error(name)
            except BadGateway as e:
                metrics.UPSTREAM_ERRORS.labels(name, "bad_response").inc()
                last = e
            except ProxyError as e:  # a 4xx from the upstream is about the request: no fallback helps
                metrics.UPSTREAM_ERRORS.labels(name, "4xx").inc()
                raise e
            else:
                ctx.answered_by = name
                metrics.child(metrics.UPSTREAM_LATENCY, name).observe(time.perf_counter() - started)
                return result
            finally:
                ctx.upstream_seconds += time.perf_counter() - started
        assert last is not None
        raise last

    async def send(self, ctx: Call) -> UpstreamReply:
        """The normalised reply of the first model in the chain that answers (usage read from it)."""
        reply = await self._with_fallbacks(ctx, lambda u: _send(u, ctx))
        if isinstance(reply, BatchedReply):
            reply.batched = True
        return reply.read_usage()

    async def open_stream(self, ctx: Call) -> Stream:
        return await self._with_fallbacks(ctx, lambda u: u.open_stream(ctx.endpoint, ctx.body, ctx.include_usage))
