"""Providers that need translation (anthropic, bedrock, vertex_ai, ...) go through litellm.

litellm is imported lazily, the first time such a model is configured: importing it costs seconds
and ~100 MB, which a proxy serving only OpenAI-compatible upstreams should never pay.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from functools import cache
from typing import Any

import orjson

from proxy.config.models import ModelConfig
from proxy.errors import BadGateway, UpstreamHTTPError, UpstreamMisconfigured
from proxy.upstream.reply import UpstreamReply
from proxy.upstream.retries import RetryableUpstreamError

_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


@cache
def _owned_by_litellm() -> Callable[[str], bool]:
    """Whether litellm takes a keyword argument of this name as its own (an endpoint, a credential, a
    route, a callback, a price...) rather than passing it to the provider."""
    types = importlib.import_module("litellm.types.utils")
    owned = getattr(types, "is_litellm_owned_kwarg", None)
    return owned if owned is not None else frozenset(types.all_litellm_params).__contains__


@cache
def _import_litellm() -> Any:
    # The packaged price map only: never fetch one over the network at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = importlib.import_module("litellm")
    # litellm's debug and info logs print whole calls (messages, parameters): prompt text must never
    # reach the proxy's logs, whatever --log-level says.
    for name in _LITELLM_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    litellm.telemetry = False
    litellm.suppress_debug_info = True  # no "Provider List: ..." banner printed with each error
    litellm.drop_params = True
    return litellm


# What litellm says when it refuses a call itself, before reaching the provider: the policy file's
# settings for the model are wrong (litellm raises these as 400/401 errors, as if the client had erred).
_CONFIG_REFUSALS = (
    ("LLM Provider NOT provided", "litellm does not know its provider"),
    ("API Key", "its provider's credential is missing: set api_key (e.g. api_key: ${PROVIDER_API_KEY})"),
)


def _config_refusal(e: Exception) -> str | None:
    message = str(getattr(e, "message", "") or e)
    for marker, reason in _CONFIG_REFUSALS:
        if marker in message and (marker != "API Key" or "Missing" in message):
            return reason
    return None


def _translate_error(e: Exception, model: str) -> Exception:
    status = getattr(e, "status_code", None)
    name = type(e).__name__
    if status in (400, 401) and (reason := _config_refusal(e)) is not None:
        return UpstreamMisconfigured(
            f"Model '{model}' is misconfigured on the proxy: {reason}. Check its entry under models: in the "
            "policy file (`llm-numbers-proxy check`)."
        )
    if name in ("Timeout", "APITimeoutError") or status == 408:
        return RetryableUpstreamError("timeout", name)
    if name == "APIConnectionError" or status is None:
        return RetryableUpstreamError("connect", name)
    message = str(getattr(e, "message", "") or e)
    body = orjson.dumps({"error": {"message": message, "type": "upstream_error", "param": None, "code": name}})
    if status == 429 or status >= 500:
        return RetryableUpstreamError("429" if status == 429 else "5xx", f"HTTP {status}", status=status, body=body)
    return UpstreamHTTPError(status, body)


class _LiteLLMStream:
    def __init__(self, stream: Any):
        self._stream = stream

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield b"data: " + orjson.dumps(chunk.model_dump(exclude_none=True)) + b"\n\n"
        except Exception as e:  # litellm raises provider-specific errors mid-stream
            raise BadGateway(f"The upstream stream broke off: {type(e).__name__}") from None
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        closer = getattr(self._stream, "aclose", None) or getattr(self._stream, "close", None)
        if closer is not None:
            try:
                res = closer()
                if hasattr(res, "close"):
                    res.close()
            except Exception:  # closing a broken stream must not mask the original outcome
                pass


class LiteLLMUpstream:
    """One configured model on a provider litellm translates for."""

    def __init__(self, name: str, cfg: ModelConfig):
        self.name = name
        self.cfg = cfg
        self._litellm = _import_litellm()
        self._model = f"{cfg.provider}/{cfg.upstream_model or name}"
        self._params: dict[str, Any] = {"num_retries": 0, "timeout": cfg.timeout_s}
        if cfg.api_key:
            self._params["api_key"] = cfg.api_key
        if cfg.api_base:
            self._params["api_base"] = cfg.api_base
        if cfg.headers:
            self._params["extra_headers"] = dict(cfg.headers)
        self._owned = _owned_by_litellm()

    def client_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body without any name litellm would read as its own argument. Validation refuses the
        ones that steer the upstream; this drops the rest (`metadata`, `tags`, prices...), so only the
        policy file ever sets litellm's arguments."""
        owned = self._owned
        return {k: v for k, v in body.items() if not owned(k)}

    async def _call(self, endpoint: str, body: dict[str, Any], **extra: Any) -> Any:
        kwargs = {**self.client_fields(body), **self._params, **extra, "model": self._model}
        fn = {
            "chat": self._litellm.acompletion,
            "completions": self._litellm.atext_completion,
            "embeddings": self._litellm.aembedding,
        }[endpoint]
        try:
            return await fn(**kwargs)
        except Exception as e:
            raise _translate_error(e, self.name) from None

    async def send(self, endpoint: str, body: dict[str, Any]) -> UpstreamReply:
        resp = await self._call(endpoint, body)
        data = resp.model_dump(exclude_none=True)
        return UpstreamReply(data, orjson.dumps(data))

    async def open_stream(self, endpoint: str, body: dict[str, Any], include_usage: bool) -> _LiteLLMStream:
        opts = {**(body.get("stream_options") or {}), "include_usage": True}
        return _LiteLLMStream(await self._call(endpoint, body, stream=True, stream_options=opts))
