"""Pass-through to Anthropic's Messages API for `provider: anthropic` models: `/v1/messages` and
`/v1/messages/count_tokens` are forwarded as they came (the model rewritten, `cache_control` and thinking
blocks untouched) with the policy file's key; other endpoints (chat completions) go through litellm.
No litellm on this path: one pooled aiohttp session and orjson, as for OpenAI-compatible upstreams."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from proxy.config.models import ModelConfig
from proxy.upstream.openai_compat import OpenAICompatUpstream
from proxy.upstream.reply import UpstreamReply

ANTHROPIC_API_BASE = "https://api.anthropic.com"
_PATHS = {"messages": "/v1/messages", "messages_count_tokens": "/v1/messages/count_tokens"}


class AnthropicUpstream(OpenAICompatUpstream):
    """One `provider: anthropic` model: its own API for Messages, litellm's translation for the rest."""

    def __init__(self, name: str, cfg: ModelConfig, session: aiohttp.ClientSession, connect_timeout_s: float):
        super().__init__(name, cfg, session, connect_timeout_s)
        base = cfg.api_base or ANTHROPIC_API_BASE
        self._base = base.removesuffix("/v1")  # litellm's reading of api_base: the host, /v1 added per path
        self._headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            self._headers["x-api-key"] = cfg.api_key
        self._translating: Any = None

    def _litellm(self) -> Any:
        if self._translating is None:
            from proxy.upstream.litellm_adapter import LiteLLMUpstream

            self._translating = LiteLLMUpstream(self.name, self.cfg)
        return self._translating

    def _native(self, body: dict[str, Any]) -> bytes:
        return orjson.dumps({**body, "model": self._upstream_model})

    async def send(self, endpoint: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> UpstreamReply:
        path = _PATHS.get(endpoint)
        if path is None:
            return await self._litellm().send(endpoint, body)
        resp = await self._post(path, self._native(body), self._timeout, headers=headers)
        return await self._json_reply(resp)

    async def open_stream(
        self, endpoint: str, body: dict[str, Any], include_usage: bool, headers: dict[str, str] | None = None
    ) -> Any:
        path = _PATHS.get(endpoint)
        if path is None:
            return await self._litellm().open_stream(endpoint, body, include_usage)
        resp = await self._post(path, self._native(body), self._stream_timeout, headers=headers)
        return await self._checked_stream(resp)

    async def stored_response(self, method: str, response_id: str) -> UpstreamReply:
        raise NotImplementedError("Anthropic keeps no responses")
