"""Dispatch: call the chosen model with retries, then its `fallbacks:` in order.

Streams are retried and fall back only until the stream is open: once the first byte has gone to
the client, a failure ends the stream. A request in a format a model's upstream does not speak (the
Responses API or Anthropic Messages to a Chat Completions server) is translated to chat for that upstream
alone, so a fallback from a native to a translating upstream (or back) answers in the client's format too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from proxy import metrics
from proxy.config.models import ModelConfig, PolicyFile, RetryConfig
from proxy.errors import BadGateway, NotFound, ProxyError
from proxy.upstream.anthropic_native import AnthropicUpstream
from proxy.upstream.batcher import BatchedReply, MicroBatcher
from proxy.upstream.openai_compat import OpenAICompatUpstream
from proxy.upstream.reply import UpstreamReply
from proxy.upstream.retries import RetryableUpstreamError, call_with_retries
from proxy.upstream.translated import TranslatedStream, reply_in_format
from proxy.wire.adapter import Endpoint
from proxy.wire.formats import BY_ENDPOINT

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
    key_rights: Any  # a runtime key's rights (proxy.services.runtime_keys.KeyRights), or None
    team: str | None  # the client's team (its `models:` bound the fallbacks); None for the proxy's own calls
    trace: Any  # the request's trace (proxy.services.tracing.RequestTrace) when tracing is on, else None
    chat_body: dict[str, Any] | None  # the request translated to chat, when made before the call
    upstream_headers: dict[str, str]  # client headers a native upstream of the format gets


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
    key_rights: Any = None
    team: str | None = None
    chat_body: dict[str, Any] | None = None
    upstream_headers: dict[str, str] = field(default_factory=dict)


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
    if cfg.provider == "anthropic":  # Messages natively; chat through litellm, imported when first used
        return AnthropicUpstream(name, cfg, session, connect_timeout_s)
    from proxy.upstream.litellm_adapter import LiteLLMUpstream

    return LiteLLMUpstream(name, cfg)


def _send(upstream: Upstream, ctx: Call, endpoint: str, body: dict[str, Any]) -> Awaitable[UpstreamReply]:
    if isinstance(upstream, MicroBatcher):
        # The one place the batcher reads the context: the tokens a request holds in the model's memory
        # (0 when nobody counted them, as for the proxy's own embedding calls: the batcher then counts).
        return upstream.send(endpoint, body, (ctx.prompt_tokens + ctx.max_output_tokens) or None)
    if isinstance(upstream, AnthropicUpstream):
        return upstream.send(endpoint, body, ctx.upstream_headers)
    return upstream.send(endpoint, body)


def _chat_body(ctx: Call) -> dict[str, Any]:
    return ctx.chat_body if ctx.chat_body is not None else BY_ENDPOINT[ctx.endpoint].to_chat(ctx.body)


async def _call(upstream: Upstream, ctx: Call) -> UpstreamReply:
    wire = BY_ENDPOINT[ctx.endpoint]
    if wire.spoken_by(upstream.cfg):
        return await _send(upstream, ctx, ctx.endpoint, ctx.body)
    chat_reply = await _send(upstream, ctx, Endpoint.CHAT, _chat_body(ctx))
    reply = reply_in_format(wire, chat_reply, ctx.body, ctx.prompt_tokens)
    reply.batched = isinstance(chat_reply, BatchedReply)
    return reply


async def _open(upstream: Upstream, ctx: Call) -> Stream:
    wire = BY_ENDPOINT[ctx.endpoint]
    if wire.spoken_by(upstream.cfg):
        if isinstance(upstream, AnthropicUpstream):
            return await upstream.open_stream(ctx.endpoint, ctx.body, ctx.include_usage, ctx.upstream_headers)
        return await upstream.open_stream(ctx.endpoint, ctx.body, ctx.include_usage)
    stream = await upstream.open_stream(Endpoint.CHAT, _chat_body(ctx), True)
    model = upstream.cfg.upstream_model or upstream.name
    return TranslatedStream(stream, wire.chat_stream(ctx.body, model, ctx.prompt_tokens))


class Dispatcher:
    def __init__(
        self,
        policy: PolicyFile,
        session: aiohttp.ClientSession,
        allowed: Mapping[str, frozenset[str]] | None = None,
    ):
        connect = policy.server.connect_timeout_s
        self._upstreams: dict[str, Upstream] = {
            name: build_upstream(name, cfg, session, connect) for name, cfg in policy.models.items()
        }
        self._retry: dict[str, RetryConfig] = {
            name: cfg.retries or policy.retries for name, cfg in policy.models.items()
        }
        self._chain: dict[str, list[str]] = {name: [name, *cfg.fallbacks] for name, cfg in policy.models.items()}
        self._allowed = allowed if allowed is not None else {}  # team -> the models its `models:` admit

    async def _with_fallbacks(self, ctx: Call, call: Callable[[Upstream], Awaitable[T]]) -> T:
        chain = self._chain[ctx.model]
        requested = ctx.model_requested
        if ctx.fallback_to_requested and requested not in chain and requested in self._upstreams:
            chain = [*chain, requested]
        if len(chain) > 1 and ctx.team in self._allowed:  # a fallback the team may not use is skipped
            team_models = self._allowed[ctx.team]
            chain = [chain[0], *(name for name in chain[1:] if name in team_models)]
        if ctx.key_rights is not None:  # and so is one the runtime key may not use
            chain = [name for name in chain if ctx.key_rights.allows(name)]
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
        reply = await self._with_fallbacks(ctx, lambda u: _call(u, ctx))
        if isinstance(reply, BatchedReply):
            reply.batched = True
        return reply.read_usage()

    async def open_stream(self, ctx: Call) -> Stream:
        return await self._with_fallbacks(ctx, lambda u: _open(u, ctx))

    def speaks(self, model: str, endpoint: str) -> bool:
        """Whether `model`'s upstream serves `endpoint`'s format itself (else it is translated to chat)."""
        return BY_ENDPOINT[endpoint].spoken_by(self._upstreams[model].cfg)

    async def count_tokens(self, ctx: Call) -> int | None:
        """A counting endpoint answered by the model's upstream when it speaks the format (Anthropic's
        count_tokens, OpenAI's input_tokens), else None: the proxy counts with the model's tokenizer."""
        upstream = self._upstreams[ctx.model]
        if not self.speaks(ctx.model, ctx.endpoint):
            return None
        started = time.perf_counter()
        try:
            reply = await call_with_retries(
                lambda: _send(upstream, ctx, ctx.endpoint, ctx.body), self._retry[ctx.model]
            )
        finally:
            ctx.upstream_seconds += time.perf_counter() - started
        count = (reply.data or {}).get("input_tokens")
        if not isinstance(count, int) or isinstance(count, bool):
            raise BadGateway("The upstream's token count has no integer 'input_tokens'.")
        return count

    async def stored_response(self, models: list[str], method: str, response_id: str) -> UpstreamReply:
        """GET or DELETE `/responses/{id}` at the first of `models` whose upstream serves the Responses API."""
        for name in models:
            upstream = self._upstreams.get(name)
            if isinstance(upstream, OpenAICompatUpstream) and self.speaks(name, Endpoint.RESPONSES):
                return await upstream.stored_response(method, response_id)
        raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
